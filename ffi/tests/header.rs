//! The checked-in C header is exactly what cbindgen generates from the source, so the
//! exported functions and the header never disagree. `KVD_FFI_BLESS=1` rewrites it.

use std::path::Path;

#[test]
fn header_matches_the_exports() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let cfg = cbindgen::Config::from_file(dir.join("cbindgen.toml")).expect("cbindgen.toml");
    let bindings = cbindgen::Builder::new()
        .with_config(cfg)
        .with_src(dir.join("src/lib.rs"))
        .generate()
        .expect("cbindgen generates the header");
    let mut fresh = Vec::new();
    bindings.write(&mut fresh);
    let path = dir.join("include/kvd.h");
    if std::env::var_os("KVD_FFI_BLESS").is_some() {
        std::fs::write(&path, &fresh).expect("write the header");
    }
    let checked_in = std::fs::read(&path).unwrap_or_default();
    assert!(
        checked_in == fresh,
        "ffi/include/kvd.h is out of date with ffi/src/lib.rs; regenerate it with \
         KVD_FFI_BLESS=1 cargo test -p kvd-ffi --test header"
    );
    let text = String::from_utf8(fresh).expect("UTF-8");
    for f in [
        "kvd_connect",
        "kvd_client_free",
        "kvd_open_namespace",
        "kvd_namespace_free",
        "kvd_namespace_id",
        "kvd_put",
        "kvd_get",
        "kvd_lookup",
        "kvd_delete",
        "kvd_chain_key",
        "kvd_last_error",
    ] {
        assert!(
            text.contains(&format!("{f}(")),
            "{f} missing from the header"
        );
    }
}
