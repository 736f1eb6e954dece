//! Configuration: a TOML file (`--config`, `WALSHIPPER_CONFIG`, or
//! /etc/walshipper/walshipper.toml) whose every key can be overridden by an
//! environment variable `WALSHIPPER_<SECTION>_<KEY>` (e.g.
//! `WALSHIPPER_REPO_PATH`). Unknown keys and bad values are errors that name
//! the key.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::error::{Error, Result};

pub const DEFAULT_CONFIG_PATH: &str = "/etc/walshipper/walshipper.toml";

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// The file this configuration came from, if any (absolute).
    #[serde(skip)]
    pub source: Option<PathBuf>,
    pub pg: PgConfig,
    pub repo: RepoConfig,
    pub encryption: EncryptionConfig,
    pub compression: CompressionConfig,
    pub archive: ArchiveConfig,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PgConfig {
    pub data_dir: PathBuf,
    pub host: String,
    pub port: u16,
    pub user: String,
    pub database: String,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RepoConfig {
    #[serde(rename = "type")]
    pub kind: String,
    pub path: PathBuf,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EncryptionConfig {
    pub passphrase_file: PathBuf,
    /// Cache unwrapped keys on this host (see keys::KeyCache).
    pub key_cache: bool,
    /// Where; empty = $HOME/.cache/walshipper.
    pub key_cache_dir: PathBuf,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CompressionConfig {
    pub level: i32,
    /// Threads that compress frames of one object; 0 = number of CPUs.
    pub threads: usize,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ArchiveConfig {
    /// Seconds `walshipper check` waits for the switched segment.
    pub check_timeout: u64,
}

impl Default for PgConfig {
    fn default() -> Self {
        PgConfig {
            data_dir: "/var/lib/postgresql/15/main".into(),
            host: "/var/run/postgresql".into(),
            port: 5432,
            user: "postgres".into(),
            database: "postgres".into(),
        }
    }
}

impl Default for RepoConfig {
    fn default() -> Self {
        RepoConfig {
            kind: "posix".into(),
            path: "/var/lib/walshipper/repo".into(),
        }
    }
}

impl Default for EncryptionConfig {
    fn default() -> Self {
        EncryptionConfig {
            passphrase_file: "/etc/walshipper/passphrase".into(),
            key_cache: true,
            key_cache_dir: PathBuf::new(),
        }
    }
}

impl Default for CompressionConfig {
    fn default() -> Self {
        CompressionConfig {
            level: 3,
            threads: 0,
        }
    }
}

impl Default for ArchiveConfig {
    fn default() -> Self {
        ArchiveConfig { check_timeout: 60 }
    }
}

/// Every key, as (section, key); the environment variable is
/// WALSHIPPER_<SECTION>_<KEY> in upper case.
pub const KEYS: &[(&str, &str)] = &[
    ("pg", "data_dir"),
    ("pg", "host"),
    ("pg", "port"),
    ("pg", "user"),
    ("pg", "database"),
    ("repo", "type"),
    ("repo", "path"),
    ("encryption", "passphrase_file"),
    ("encryption", "key_cache"),
    ("encryption", "key_cache_dir"),
    ("compression", "level"),
    ("compression", "threads"),
    ("archive", "check_timeout"),
];

/// Environment variables with a meaning of their own (not config keys).
const SPECIAL_ENV: &[&str] = &[
    "WALSHIPPER_CONFIG",
    "WALSHIPPER_PASSPHRASE",
    "WALSHIPPER_LOG",
];

pub fn env_name(section: &str, key: &str) -> String {
    format!("WALSHIPPER_{}_{}", section, key).to_uppercase()
}

fn parse<T: std::str::FromStr>(name: &str, v: &str, what: &str) -> Result<T> {
    v.trim()
        .parse()
        .map_err(|_| Error::Config(format!("{name}: '{v}' is not {what}")))
}

impl Config {
    /// Loads the file (if `path` is None, the default path, which may be
    /// absent), then applies environment overrides, then validates.
    pub fn load(path: Option<&Path>) -> Result<Config> {
        Self::load_with_env(path, std::env::vars())
    }

    pub fn load_with_env(
        path: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config> {
        let file = match path {
            Some(p) => Some(p.to_path_buf()),
            None if Path::new(DEFAULT_CONFIG_PATH).exists() => {
                Some(PathBuf::from(DEFAULT_CONFIG_PATH))
            }
            None => None,
        };
        let mut cfg = match &file {
            Some(p) => Self::from_file(p)?,
            None => Config::default(),
        };
        cfg.source = file.map(|p| std::path::absolute(&p).unwrap_or(p));
        for (name, value) in env {
            if !name.starts_with("WALSHIPPER_") || SPECIAL_ENV.contains(&name.as_str()) {
                continue;
            }
            match KEYS.iter().find(|(s, k)| env_name(s, k) == name) {
                Some((s, k)) => cfg.set(s, k, &value, &name)?,
                None => {
                    return Err(Error::Config(format!(
                        "unknown environment variable {name} (known: {})",
                        KEYS.iter()
                            .map(|(s, k)| env_name(s, k))
                            .collect::<Vec<_>>()
                            .join(", ")
                    )))
                }
            }
        }
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn from_file(path: &Path) -> Result<Config> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::Config(format!("cannot read {}: {e}", path.display())))?;
        toml::from_str(&text).map_err(|e| Error::Config(format!("{}: {e}", path.display())))
    }

    fn set(&mut self, section: &str, key: &str, v: &str, name: &str) -> Result<()> {
        match (section, key) {
            ("pg", "data_dir") => self.pg.data_dir = v.into(),
            ("pg", "host") => self.pg.host = v.into(),
            ("pg", "port") => self.pg.port = parse(name, v, "a port number")?,
            ("pg", "user") => self.pg.user = v.into(),
            ("pg", "database") => self.pg.database = v.into(),
            ("repo", "type") => self.repo.kind = v.into(),
            ("repo", "path") => self.repo.path = v.into(),
            ("encryption", "passphrase_file") => self.encryption.passphrase_file = v.into(),
            ("encryption", "key_cache") => {
                self.encryption.key_cache = parse(name, v, "true or false")?
            }
            ("encryption", "key_cache_dir") => self.encryption.key_cache_dir = v.into(),
            ("compression", "level") => self.compression.level = parse(name, v, "an integer")?,
            ("compression", "threads") => {
                self.compression.threads = parse(name, v, "a whole number")?
            }
            ("archive", "check_timeout") => {
                self.archive.check_timeout = parse(name, v, "a number of seconds")?
            }
            _ => return Err(Error::Config(format!("unknown key {section}.{key}"))),
        }
        Ok(())
    }

    pub fn validate(&self) -> Result<()> {
        if self.repo.kind != "posix" {
            return Err(Error::Config(format!(
                "repo.type: unsupported value '{}' (supported: posix)",
                self.repo.kind
            )));
        }
        if !self.repo.path.is_absolute() {
            return Err(Error::Config(format!(
                "repo.path: '{}' must be an absolute path",
                self.repo.path.display()
            )));
        }
        if !(1..=19).contains(&self.compression.level) {
            return Err(Error::Config(format!(
                "compression.level: {} is out of range (1 to 19; 3 is a good default)",
                self.compression.level
            )));
        }
        if self.compression.threads > 256 {
            return Err(Error::Config(format!(
                "compression.threads: {} is too many (0 = one per CPU)",
                self.compression.threads
            )));
        }
        if self.pg.port == 0 {
            return Err(Error::Config("pg.port: 0 is not a port".into()));
        }
        Ok(())
    }

    pub fn threads(&self) -> usize {
        match self.compression.threads {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        }
    }

    /// The passphrase: WALSHIPPER_PASSPHRASE wins over the file.
    pub fn passphrase(&self) -> Result<Vec<u8>> {
        if let Ok(p) = std::env::var("WALSHIPPER_PASSPHRASE") {
            if p.is_empty() {
                return Err(Error::Config(
                    "WALSHIPPER_PASSPHRASE is set but empty".into(),
                ));
            }
            return Ok(p.into_bytes());
        }
        crate::keys::read_passphrase_file(&self.encryption.passphrase_file)
    }

    pub fn key_cache_dir(&self) -> Option<PathBuf> {
        if !self.encryption.key_cache {
            return None;
        }
        if !self.encryption.key_cache_dir.as_os_str().is_empty() {
            return Some(self.encryption.key_cache_dir.clone());
        }
        std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/walshipper"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str, env: &[(&str, &str)]) -> Result<Config> {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("w.toml");
        std::fs::write(&p, text).unwrap();
        Config::load_with_env(
            Some(&p),
            env.iter().map(|(a, b)| (a.to_string(), b.to_string())),
        )
    }

    #[test]
    fn file_and_env_override() {
        let c = load(
            "[repo]\npath = \"/r\"\n[compression]\nlevel = 5\n",
            &[
                ("WALSHIPPER_PG_PORT", "5433"),
                ("WALSHIPPER_REPO_PATH", "/x"),
            ],
        )
        .unwrap();
        assert_eq!(c.compression.level, 5);
        assert_eq!(c.pg.port, 5433);
        assert_eq!(c.repo.path, PathBuf::from("/x"));
    }

    #[test]
    fn unknown_and_bad_keys_are_named() {
        let e = load("[repo]\npaht = \"/r\"\n", &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("paht"), "{e}");
        let e = load("[compression]\nlevel = 40\n", &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("compression.level"), "{e}");
        let e = load("", &[("WALSHIPPER_PG_PORT", "abc")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("WALSHIPPER_PG_PORT"), "{e}");
        let e = load("", &[("WALSHIPPER_REPO_PAHT", "/x")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("WALSHIPPER_REPO_PAHT"), "{e}");
        let e = load("[repo]\ntype = \"s4\"\n", &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("repo.type"), "{e}");
        let e = load("[pg]\nport = \"x\"\n", &[]).unwrap_err().to_string();
        assert!(e.contains("port"), "{e}");
    }
}
