//! `aos-cm demo` converges and exits 0, with a summary a person can read.

use std::process::Command;

#[test]
fn demo_converges_the_bundled_example() {
    let out = Command::new(env!("CARGO_BIN_EXE_aos-cm"))
        .args(["demo", "--timeout", "60"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("converged in"), "{stdout}");
    assert!(stdout.contains("nodes connected 3/3"), "{stdout}");
    // The example README's placement: gateway and telemetry on main, vision on secondary-1.
    let main = stdout
        .split("  main:")
        .nth(1)
        .unwrap()
        .split("  secondary-1:")
        .next()
        .unwrap();
    assert_eq!(main.matches("on crun").count(), 3, "{main}");
    assert!(stdout.contains("subnet 172.17.0.0/16, vlan 1"), "{stdout}");
}

#[test]
fn demo_scales_and_rejects_non_loopback_listen() {
    let out = Command::new(env!("CARGO_BIN_EXE_aos-cm"))
        .args(["demo", "--nodes", "4", "--instances", "40"])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("nodes connected 4/4"));
    let out = Command::new(env!("CARGO_BIN_EXE_aos-cm"))
        .args(["demo", "--sm-listen", "192.0.2.1:8093"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("loopback only"));
}
