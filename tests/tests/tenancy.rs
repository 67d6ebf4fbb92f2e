//! Tenants on one node: a client of another uid must neither see a tenant's namespaces in
//! `Stats` nor open them (opening hands over the arena mapped read-write). The clients run
//! as other uids, so these tests need root; without it they say so and pass vacuously.

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};

use kvd_tests::{bin, Daemon};

const VICTIM: u32 = 65534;
const OTHER: u32 = 65533;
const TENANT: &str = "team-a|salt=0123456789abcdef";

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// A daemon other uids can reach: its directory and socket opened up, both uids allowed.
fn daemon(extra: &[&str]) -> Daemon {
    let mut sets = vec![
        format!("server.allowed_uids=[{VICTIM}, {OTHER}]"),
        "server.socket_mode=438".into(),
    ];
    sets.extend(extra.iter().map(|s| s.to_string()));
    let sets: Vec<&str> = sets.iter().map(String::as_str).collect();
    let d = Daemon::start(&sets);
    std::fs::set_permissions(d.dir.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    // The build directory may be out of other uids' reach (under /root): a copy they can run.
    std::fs::copy(bin("kvd-test-client"), d.dir.path().join("kvd-test-client")).expect("copy");
    d
}

fn client(d: &Daemon, uid: u32, mode: &str, tenant: &str) -> Command {
    let mut c = Command::new(d.dir.path().join("kvd-test-client"));
    c.arg("--socket")
        .arg(&d.socket)
        .args(["--mode", mode, "--tenant", tenant, "--block-bytes", "4096"])
        .uid(uid)
        .gid(uid)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    c
}

/// Waits for `child` to print its first line, "ready".
fn wait_ready(child: &mut Child, who: &str) {
    let mut line = String::new();
    BufReader::new(child.stdout.as_mut().expect("stdout"))
        .read_line(&mut line)
        .expect("read");
    assert_eq!(line.trim(), "ready", "{who}: {line}");
}

/// The victim: holds `TENANT`'s namespace open with one block in it.
fn victim(d: &Daemon) -> Child {
    let mut v = client(d, VICTIM, "tenant-hold", TENANT)
        .spawn()
        .expect("spawn");
    wait_ready(&mut v, "victim");
    v
}

fn probe(d: &Daemon, uid: u32, tenant: &str) -> String {
    let out = client(d, uid, "tenant-probe", tenant)
        .output()
        .expect("probe");
    assert!(out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn another_uid_neither_sees_nor_opens_a_tenants_namespace() {
    if !is_root() {
        eprintln!("skipped: running clients as other uids needs root");
        return;
    }
    let d = daemon(&[]);
    let mut v = victim(&d);
    let seen = probe(&d, OTHER, TENANT);
    assert!(seen.starts_with("namespaces 0\n"), "{seen}");
    assert!(!seen.contains("salt="), "{seen}");
    assert!(
        seen.contains("refused:") && seen.contains("Unauthorized"),
        "{seen}"
    );
    // The owner itself still opens it (a second engine of the same uid).
    let own = probe(&d, VICTIM, TENANT);
    assert!(own.ends_with("opened\n"), "{own}");
    // The shared empty tenant stays open to both (today's single-tenant setups).
    assert!(probe(&d, OTHER, "").ends_with("opened\n"));
    // An admin sees everything, and who holds what (the tenant's base, never its salt).
    let s = d.admin().stats().expect("stats");
    assert!(s
        .namespaces
        .iter()
        .any(|n| n.desc.tenant == TENANT && n.owner_uid == VICTIM));
    let status = d.ctl(&["status"]);
    let row = status
        .lines()
        .find(|l| l.contains("team-a"))
        .unwrap_or_else(|| panic!("no team-a row: {status}"));
    assert!(row.contains(&VICTIM.to_string()), "{row}");
    assert!(!status.contains("salt="), "{status}");
    assert!(
        !d.log_text().contains("salt="),
        "tenants are not logged at info"
    );
    let _ = v.kill();
    let _ = v.wait();
}

#[test]
fn configured_rules_decide_who_opens_which_tenant() {
    if !is_root() {
        eprintln!("skipped: running clients as other uids needs root");
        return;
    }
    let rules = format!(
        "server.tenants=[{{uids=[{VICTIM}], tenants=[\"team-a\"]}}, \
         {{gids=[{OTHER}], tenants=[\"team-b*\", \"\"]}}]"
    );
    let d = daemon(&[&rules]);
    let mut v = victim(&d);
    assert!(probe(&d, OTHER, TENANT).contains("refused:"));
    assert!(probe(&d, OTHER, "team-b2").ends_with("opened\n"));
    assert!(probe(&d, OTHER, "").ends_with("opened\n"));
    let e = probe(&d, VICTIM, "team-b2");
    assert!(e.contains("server.tenants"), "{e}");
    let _ = v.kill();
    let _ = v.wait();
}

/// Whoever takes the socket path first must not be trusted by clients: a socket served by
/// another uid, in a directory that uid does not own, is refused before anything is sent.
#[test]
fn clients_refuse_a_socket_served_by_another_uid() {
    if !is_root() {
        eprintln!("skipped: serving a socket as another uid needs root");
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o1777)).expect("chmod");
    let sock = dir.path().join("kvd.sock");
    let serve = "import socket,sys,time\n\
        s=socket.socket(socket.AF_UNIX)\ns.bind(sys.argv[1])\ns.listen(4)\n\
        print('ready',flush=True)\ntime.sleep(30)";
    let mut impostor = Command::new("python3")
        .args(["-c", serve])
        .arg(&sock)
        .uid(VICTIM)
        .gid(VICTIM)
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3");
    wait_ready(&mut impostor, "impostor");
    let out = Command::new(bin("kvd-ctl"))
        .arg("--socket")
        .arg(&sock)
        .arg("status")
        .env_remove("KVD_SERVER_UID")
        .output()
        .expect("kvd-ctl");
    let _ = impostor.kill();
    let _ = impostor.wait();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains(&format!("served by uid {VICTIM}")), "{err}");
}
