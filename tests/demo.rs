//! `aos-cm demo` converges and exits 0, with a summary a person can read.

use std::process::Command;

/// Runs `aos-cm demo ARGS`, asserts exit status 0 and returns what it printed.
fn demo_ok(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_aos-cm"))
        .arg("demo")
        .args(args)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

#[test]
fn demo_converges_the_bundled_example() {
    let stdout = demo_ok(&["--timeout", "60"]);
    assert!(stdout.contains("converged in"), "{stdout}");
    assert!(stdout.contains("nodes connected 3/3"), "{stdout}");
    // The daemon took the identity and the nodes from the simulated IAM.
    assert!(
        stdout.contains("simulated IAM: http://127.0.0.1:")
            && stdout.contains("system ID 3f9c2a7e51d84b0c9e6a1d2b4c8f0e17, 3 node(s)"),
        "{stdout}"
    );
    // The example README's placement: gateway and telemetry on main, vision on secondary-1.
    let main = stdout
        .split("  main:")
        .nth(1)
        .unwrap()
        .split("  secondary-1:")
        .next()
        .unwrap();
    assert_eq!(main.matches("on crun").count(), 3, "{main}");
    // One network per service owner; which owner asks first (and so gets 172.17/16) varies.
    assert!(stdout.contains("subnet 172.17.0.0/16, vlan 1"), "{stdout}");
    assert!(stdout.contains("subnet 172.18.0.0/16, vlan 2"), "{stdout}");
    // The desired state and the blobs came through the simulated cloud, which got the status.
    assert!(
        stdout.contains("the cloud sent the desired state"),
        "{stdout}"
    );
    assert!(stdout.contains("items installed 5/5"), "{stdout}");
    assert!(stdout.contains("component v2.3.0: installed"), "{stdout}");
    assert!(
        stdout.contains("6 instance(s) active on 3 node(s)"),
        "{stdout}"
    );
}

/// The soak's churn: every period's desired state converges, through a cloud connection drop
/// and an SM reconnect. The product paces the periods (1 s each); the test only reads output.
#[test]
fn demo_churn_converges_every_period_through_reconnects() {
    let stdout = demo_ok(&["--churn", "1", "--run-for", "6"]);
    for period in [
        "period 1: variant 1: converged in",
        "period 3: variant 3 (SM main reconnected): converged in",
        "period 6: variant 2 (cloud connection dropped): converged in",
    ] {
        assert!(stdout.contains(period), "{period}\n{stdout}");
    }
    assert!(
        stdout.contains("churn done: 6 periods, 6 converged within their period"),
        "{stdout}"
    );
    assert!(
        stdout.contains("1 cloud drops, 1 SM reconnects"),
        "{stdout}"
    );

    // The churn needs the bundled example's cloud-borne desired state.
    let out = Command::new(env!("CARGO_BIN_EXE_aos-cm"))
        .args(["demo", "--nodes", "2", "--churn", "1"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot be used with"));
}

#[test]
fn demo_scales_and_rejects_non_loopback_listen() {
    let stdout = demo_ok(&["--nodes", "4", "--instances", "40"]);
    assert!(stdout.contains("nodes connected 4/4"), "{stdout}");
    let out = Command::new(env!("CARGO_BIN_EXE_aos-cm"))
        .args(["demo", "--sm-listen", "192.0.2.1:8093"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("loopback only"));
}

#[test]
fn status_reads_the_store_the_demo_left() {
    let dir = tempfile::tempdir().unwrap();
    let bin = env!("CARGO_BIN_EXE_aos-cm");
    let out = Command::new(bin)
        .arg("demo")
        .arg("--workdir")
        .arg(dir.path())
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let out = Command::new(bin)
        .args(["status", "--store"])
        .arg(dir.path())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(text.contains("nodes (3):"), "{text}");
    assert!(text.contains("instances (6):"), "{text}");
    assert!(text.contains("networks (2):"), "{text}");
    assert!(text.contains("conditions (0):"), "{text}");
    let out = Command::new(bin)
        .args(["status", "--json", "--store"])
        .arg(dir.path())
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["placements"].as_array().unwrap().len(), 6);
    let missing = Command::new(bin)
        .args(["status", "--store", "/nonexistent-aos-cm"])
        .output()
        .unwrap();
    assert_eq!(missing.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("no store there"));
}
