//! The extension's SQL lives in ../sql and is compiled in by
//! extension_sql_file!; make cargo rebuild when it changes.
fn main() {
    println!("cargo:rerun-if-changed=../sql");
    println!("cargo:rerun-if-changed=build.rs");
}
