//! Malformed inputs: each is rejected by `aos-cm validate` with exit code 2 and an error that
//! names the field by its JSON path; the valid originals pass.

use serde_json::{Value, json};
use std::path::Path;
use std::process::Command;

fn example(file: &str) -> String {
    std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("examples/desired-states/fresh-install")
            .join(file),
    )
    .unwrap()
}

fn validate(text: &str, kind: Option<&str>) -> (i32, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("input.json");
    std::fs::write(&path, text).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_aos-cm"));
    cmd.arg("validate").arg(&path);
    if let Some(k) = kind {
        cmd.args(["--kind", k]);
    }
    let out = cmd.output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

fn frame() -> Value {
    serde_json::from_str(&example("desired.json")).unwrap()
}

fn set(v: &mut Value, pointer: &str, new: Value) {
    *v.pointer_mut(pointer)
        .unwrap_or_else(|| panic!("no {pointer}")) = new;
}

fn remove(v: &mut Value, pointer: &str) {
    let (parent, key) = pointer.rsplit_once('/').unwrap();
    v.pointer_mut(parent)
        .unwrap()
        .as_object_mut()
        .unwrap()
        .remove(key)
        .unwrap();
}

#[test]
fn valid_examples_pass() {
    assert_eq!(validate(&example("desired.json"), None).0, 0);
    assert_eq!(validate(&example("unitconfig.json"), None).0, 0);
    let cfg =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("aos_cm.cfg.sample"))
            .unwrap();
    let (code, err) = validate(&cfg, None);
    assert_eq!(code, 0, "{err}");
}

#[test]
fn malformed_frames_name_the_field() {
    type Edit = fn(&mut Value);
    let cases: Vec<(&str, Edit, &str)> = vec![
        (
            "missing item id",
            |v| remove(v, "/data/items/0/item/id"),
            "data.items[0].item.id: is required",
        ),
        (
            "missing item type",
            |v| remove(v, "/data/items/1/item/type"),
            "data.items[1].item.type: is required",
        ),
        (
            "unknown item type",
            |v| set(v, "/data/items/0/item/type", json!("servce")),
            "data.items[0].item.type: unknown value \"servce\"",
        ),
        (
            "item id wrong type",
            |v| set(v, "/data/items/0/item/id", json!(42)),
            "data.items[0].item.id: expected a string",
        ),
        (
            "over-long item id",
            |v| set(v, "/data/items/0/item/id", json!("x".repeat(65))),
            "data.items[0].item.id: is 65 characters long",
        ),
        (
            "missing owner",
            |v| remove(v, "/data/items/2/owner"),
            "data.items[2].owner: is required",
        ),
        (
            "bad digest",
            |v| set(v, "/data/items/0/indexDigest", json!("sha256:abc")),
            "data.items[0].indexDigest",
        ),
        (
            "digest wrong algorithm",
            |v| set(v, "/data/items/0/indexDigest", json!("md5:0123")),
            "data.items[0].indexDigest",
        ),
        (
            "five labels",
            |v| {
                set(
                    v,
                    "/data/instances/0/labels",
                    json!(["a", "b", "c", "d", "e"]),
                )
            },
            "data.instances[0].labels: has 5 labels",
        ),
        (
            "label wrong type",
            |v| set(v, "/data/instances/0/labels", json!([1])),
            "data.instances[0].labels[0]: expected a string",
        ),
        (
            "numInstances object",
            |v| set(v, "/data/instances/0/numInstances", json!({})),
            "data.instances[0].numInstances: expected an unsigned integer",
        ),
        (
            "negative priority",
            |v| set(v, "/data/instances/0/priority", json!(-1)),
            "data.instances[0].priority",
        ),
        (
            "missing subject id",
            |v| remove(v, "/data/instances/1/subject/id"),
            "data.instances[1].subject.id: is required",
        ),
        (
            "unknown subject type",
            |v| set(v, "/data/subjects/0/type", json!("team")),
            "data.subjects[0].type: unknown value \"team\"",
        ),
        (
            "isReportedFromUnit string",
            |v| set(v, "/data/subjects/1/isReportedFromUnit", json!("yes")),
            "data.subjects[1].isReportedFromUnit: expected a boolean",
        ),
        (
            "unknown node state",
            |v| set(v, "/data/nodes/0/state", json!("sleeping")),
            "data.nodes[0].state: unknown value \"sleeping\"",
        ),
        (
            "missing node codename",
            |v| remove(v, "/data/nodes/1/item/codename"),
            "data.nodes[1].item.codename: is required",
        ),
        (
            "bad unit config semver",
            |v| set(v, "/data/unitConfig/version", json!("1.2")),
            "data.unitConfig.version: invalid semantic version",
        ),
        (
            "unit config labels > 4",
            |v| {
                set(
                    v,
                    "/data/unitConfig/nodes/0/labels",
                    json!(["a", "b", "c", "d", "e"]),
                )
            },
            "data.unitConfig.nodes[0].labels: has 5 labels",
        ),
        (
            "unit config bad minTimeout",
            |v| {
                set(
                    v,
                    "/data/unitConfig/nodes/0/alertRules/ram/minTimeout",
                    json!("soon"),
                )
            },
            "data.unitConfig.nodes[0].alertRules.ram.minTimeout",
        ),
        (
            "missing nodeGroupSubject",
            |v| remove(v, "/data/unitConfig/nodes/0/nodeGroupSubject"),
            "data.unitConfig.nodes[0].nodeGroupSubject: is required",
        ),
        (
            "wrong protocol version",
            |v| set(v, "/header/version", json!(6)),
            "header.version: protocol version 6 is not supported",
        ),
        (
            "unknown message type",
            |v| set(v, "/data/messageType", json!("desiredState")),
            "data.messageType: unknown message type",
        ),
        (
            "items not an array",
            |v| set(v, "/data/items", json!({})),
            "data.items: expected an array",
        ),
        ("missing data", |v| remove(v, "/data"), "data: is required"),
    ];
    assert!(cases.len() >= 20);
    for (name, edit, want) in cases {
        let mut v = frame();
        edit(&mut v);
        let (code, err) = validate(&v.to_string(), None);
        assert_eq!(code, 2, "{name}: exit code, stderr: {err}");
        assert!(err.contains(want), "{name}: expected {want:?} in:\n{err}");
    }
}

#[test]
fn several_errors_are_all_reported() {
    let mut v = frame();
    remove(&mut v, "/data/items/0/item/id");
    set(&mut v, "/data/items/1/item/type", json!("nope"));
    let (code, err) = validate(&v.to_string(), None);
    assert_eq!(code, 2);
    assert!(err.contains("data.items[0].item.id"), "{err}");
    assert!(err.contains("data.items[1].item.type"), "{err}");
}

#[test]
fn truncated_and_non_json_inputs() {
    let text = example("desired.json");
    let (code, err) = validate(&text[..text.len() / 2], None);
    assert_eq!(code, 2);
    assert!(err.contains("invalid JSON at line"), "{err}");
    let (code, err) = validate("[1, 2]", None);
    assert_eq!(code, 2);
    assert!(
        err.contains("not a v7 frame, a unit config or an aos_cm.cfg"),
        "{err}"
    );
}

#[test]
fn case_insensitive_keys_and_string_numbers_are_accepted() {
    let mut v = frame();
    let inst = v
        .pointer_mut("/data/instances/0")
        .unwrap()
        .as_object_mut()
        .unwrap();
    let n = inst.remove("numInstances").unwrap();
    inst.insert("NUMINSTANCES".into(), json!(n.to_string()));
    let (code, err) = validate(&v.to_string(), None);
    assert_eq!(code, 0, "{err}");
}

#[test]
fn malformed_unit_config_and_config() {
    let (code, err) = validate(
        r#"{"formatVersion": "7", "version": "x", "nodes": []}"#,
        None,
    );
    assert_eq!(code, 2);
    assert!(err.contains("version: invalid semantic version"), "{err}");
    let (code, err) = validate(
        r#"{"workingDir": "/var/aos", "monitoring": {"sendPeriod": "ten"}}"#,
        None,
    );
    assert_eq!(code, 2);
    assert!(err.contains("monitoring.sendPeriod"), "{err}");
    let (code, err) = validate(r#"{"workingDir": 5}"#, Some("config"));
    assert_eq!(code, 2);
    assert!(err.contains("workingDir"), "{err}");
}

#[test]
fn other_message_types_are_validated_too() {
    let frame = |data: serde_json::Value| {
        json!({"header": {"version": 7, "systemId": "unit", "createdAt": "2026-01-01T00:00:00.000000Z", "txn": "t"}, "data": data})
            .to_string()
    };
    assert_eq!(validate(&frame(json!({"messageType": "ack"})), None).0, 0);
    let (code, err) = validate(
        &frame(json!({"messageType": "requestLog", "correlationId": "c", "logType": "systemLog"})),
        None,
    );
    assert_eq!(code, 2);
    assert!(
        err.contains("requestLog") && err.contains("filter"),
        "{err}"
    );
    let (code, err) = validate(
        &frame(json!({"messageType": "nack", "retryAfter": "soon"})),
        None,
    );
    assert_eq!(code, 2);
    assert!(err.contains("nack"), "{err}");
}
