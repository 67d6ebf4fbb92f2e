//! A C program compiled against the checked-in header and the built library, run against a
//! live daemon: what a C or C++ engine would do.

use std::path::{Path, PathBuf};
use std::process::Command;

use kvd_tests::Daemon;

/// Directory of the built `libkvd_ffi.so` (the profile directory above this test's deps/).
fn lib_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable");
    exe.parent()
        .and_then(Path::parent)
        .expect("target profile directory")
        .to_path_buf()
}

#[test]
fn c_program_puts_and_gets_through_a_running_daemon() {
    if Command::new("cc").arg("--version").output().is_err() {
        eprintln!("SKIPPED: no C compiler (cc)");
        return;
    }
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    let lib = lib_dir();
    assert!(
        lib.join("libkvd_ffi.so").exists(),
        "libkvd_ffi.so not found in {}: build it first (cargo build --workspace); \
        `cargo test` alone does not refresh it",
        lib.display()
    );
    let out_dir = tempfile::tempdir().expect("tempdir");
    let exe = out_dir.path().join("put_get");
    let cc = Command::new("cc")
        .args(["-std=c11", "-O1", "-Wall", "-Wextra", "-Werror", "-I"])
        .arg(here.join("include"))
        .arg(here.join("tests/c/put_get.c"))
        .arg("-L")
        .arg(&lib)
        .args(["-lkvd_ffi", &format!("-Wl,-rpath,{}", lib.display()), "-o"])
        .arg(&exe)
        .output()
        .expect("run cc");
    assert!(
        cc.status.success(),
        "cc failed:\n{}",
        String::from_utf8_lossy(&cc.stderr)
    );
    let d = Daemon::start(&[]);
    let run = Command::new(&exe)
        .arg(&d.socket)
        .output()
        .expect("run the C program");
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success() && stdout.contains("C-OK"),
        "C program failed ({:?}):\n{stdout}\n{}",
        run.status,
        String::from_utf8_lossy(&run.stderr)
    );
    assert!(d.ctl(&["status"]).contains("c-model"));
}
