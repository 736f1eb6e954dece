//! Quoting for the places a name or value lands in when walshipper talks to
//! PostgreSQL: SQL identifiers and literals, libpq connection strings, the
//! name patterns of pg_dump's `-n`, and parsing `schema.table` the way
//! PostgreSQL's `parse_ident()` reads it. Everything built into SQL text
//! goes through here; values that can be passed as protocol parameters are
//! passed that way instead.

use crate::error::{Error, Result};

/// PostgreSQL's identifier length limit (NAMEDATALEN - 1).
pub const MAX_IDENT: usize = 63;

/// An identifier for SQL text: always double-quoted, `"` doubled. Always
/// quoting is never wrong (a keyword or mixed case needs it) and needs no
/// keyword list.
pub fn ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// `schema.name`, both parts quoted.
pub fn qualified(schema: &str, name: &str) -> String {
    format!("{}.{}", ident(schema), ident(name))
}

/// An identifier as a person reads it: bare when PostgreSQL would read it
/// back unchanged unquoted (lower case letters, digits, `_`), else quoted.
/// For messages and reports, not for SQL (a keyword would stay bare).
pub fn display_ident(name: &str) -> String {
    let plain = name
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if plain {
        name.to_string()
    } else {
        ident(name)
    }
}

/// `schema.name` for messages and reports.
pub fn display_qualified(schema: &str, name: &str) -> String {
    format!("{}.{}", display_ident(schema), display_ident(name))
}

/// A string literal for SQL text, as PostgreSQL's quote_literal writes it:
/// `'` doubled, and with a backslash the E'' form (backslashes doubled), so
/// that the value reads back the same whatever standard_conforming_strings is.
pub fn literal(value: &str) -> String {
    let body = value.replace('\'', "''");
    if value.contains('\\') {
        format!("E'{}'", body.replace('\\', "\\\\"))
    } else {
        format!("'{body}'")
    }
}

/// A libpq connection string from keyword/value pairs, each value in single
/// quotes with `\` and `'` escaped (libpq's conninfo syntax), so that a
/// database name like `x host=evil` stays one value.
pub fn conninfo(pairs: &[(&str, &str)]) -> String {
    pairs
        .iter()
        .map(|(k, v)| format!("{k}='{}'", v.replace('\\', "\\\\").replace('\'', "\\'")))
        .collect::<Vec<_>>()
        .join(" ")
}

/// A pattern for pg_dump's `-n`/`-t` (psql's pattern syntax) matching
/// exactly `name`: inside double quotes `*`, `?`, `.` and regular
/// expression characters are literal, and `""` is a quote.
pub fn exact_pattern(name: &str) -> String {
    ident(name)
}

/// Checks a name walshipper will create (a schema, a role).
pub fn check_name(what: &str, name: &str) -> Result<()> {
    if name.is_empty() || name.len() > MAX_IDENT {
        return Err(Error::Invalid(format!(
            "{what} must be 1 to {MAX_IDENT} bytes long (PostgreSQL's identifier limit)"
        )));
    }
    if name.chars().any(|c| c == '\0') {
        return Err(Error::Invalid(format!("{what} contains a NUL character")));
    }
    Ok(())
}

fn is_ident_start(c: char) -> bool {
    c.is_ascii_alphabetic() || c == '_' || !c.is_ascii()
}

fn is_ident_cont(c: char) -> bool {
    is_ident_start(c) || c.is_ascii_digit() || c == '$'
}

/// Parses a possibly qualified name as PostgreSQL's `parse_ident()` does:
/// parts separated by `.`, each either `"quoted"` (kept as written, `""`
/// for a quote) or unquoted (letters, digits, `_`, `$`; ASCII folded to
/// lower case). Whitespace around the dots is allowed.
pub fn parse_ident(text: &str) -> std::result::Result<Vec<String>, String> {
    let mut parts = Vec::new();
    let mut chars = text.chars().peekable();
    let skip_space = |it: &mut std::iter::Peekable<std::str::Chars>| {
        while it.peek().is_some_and(|c| c.is_whitespace()) {
            it.next();
        }
    };
    loop {
        skip_space(&mut chars);
        let mut part = String::new();
        match chars.peek() {
            Some('"') => {
                chars.next();
                loop {
                    match chars.next() {
                        None => return Err("a quoted name is not closed".into()),
                        Some('"') => {
                            if chars.peek() == Some(&'"') {
                                chars.next();
                                part.push('"');
                            } else {
                                break;
                            }
                        }
                        Some(c) => part.push(c),
                    }
                }
                if part.is_empty() {
                    return Err("a quoted name is empty".into());
                }
            }
            Some(c) if is_ident_start(*c) => {
                while let Some(c) = chars.peek().copied().filter(|c| is_ident_cont(*c)) {
                    part.push(c.to_ascii_lowercase());
                    chars.next();
                }
            }
            Some(c) => return Err(format!("unexpected character {c:?}")),
            None => return Err("a name is missing".into()),
        }
        if part.len() > MAX_IDENT {
            return Err(format!(
                "{} is longer than {MAX_IDENT} bytes",
                display_ident(&part)
            ));
        }
        parts.push(part);
        skip_space(&mut chars);
        match chars.next() {
            None => return Ok(parts),
            Some('.') => continue,
            Some(c) => return Err(format!("unexpected character {c:?}")),
        }
    }
}

/// `schema.table` (or `table`, meaning `public.table`) as (schema, table).
pub fn parse_table(text: &str) -> Result<(String, String)> {
    let bad = |why: String| {
        Error::Invalid(format!(
            "--table {text:?}: {why}; write schema.table in SQL syntax (\"Quoted\" keeps case)"
        ))
    };
    let mut parts = parse_ident(text).map_err(bad)?;
    match parts.len() {
        1 => Ok(("public".into(), parts.remove(0))),
        2 => {
            let t = parts.remove(1);
            Ok((parts.remove(0), t))
        }
        _ => Err(bad("too many dots".into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_like_parse_ident() {
        assert_eq!(
            parse_table("Sales.Orders").unwrap(),
            ("sales".into(), "orders".into())
        );
        assert_eq!(
            parse_table("\"Sales\".\"Or\"\"ders.x\"").unwrap(),
            ("Sales".into(), "Or\"ders.x".into())
        );
        assert_eq!(
            parse_table("accounts").unwrap(),
            ("public".into(), "accounts".into())
        );
        assert_eq!(
            parse_table(" a . \"B\" ").unwrap(),
            ("a".into(), "B".into())
        );
        assert_eq!(parse_table("t$1").unwrap(), ("public".into(), "t$1".into()));
        for bad in [
            "", "a.", ".a", "a.b.c", "\"\"", "\"open", "1abc", "a b", "a;drop",
        ] {
            assert!(parse_table(bad).is_err(), "{bad:?} accepted");
        }
        assert!(parse_table(&"x".repeat(64)).is_err());
    }

    #[test]
    fn quoting() {
        assert_eq!(ident("a\"b"), "\"a\"\"b\"");
        assert_eq!(qualified("s", "T"), "\"s\".\"T\"");
        assert_eq!(display_qualified("public", "Orders"), "public.\"Orders\"");
        assert_eq!(literal("it's"), "'it''s'");
        assert_eq!(literal("a\\'b"), "E'a\\\\''b'");
        assert_eq!(
            conninfo(&[("host", "/tmp/x y"), ("dbname", "a' host=evil\\")]),
            "host='/tmp/x y' dbname='a\\' host=evil\\\\'"
        );
    }
}
