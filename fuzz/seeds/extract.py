# Builds the seed corpora of the fuzz targets from the examples and the frames in the tests.
# Run from the repository root: python3 fuzz/seeds/extract.py
import glob, hashlib, json, os, re

SYSTEM_ID = "3f9c2a7e51d84b0c9e6a1d2b4c8f0e17"
HEADER = {"version": 7, "systemId": SYSTEM_ID,
          "createdAt": "2026-05-07T05:44:11.061622Z",
          "txn": "5f0c1a2e-6f55-4c8e-9a3c-3c2b1c7d9e01"}

def put(target, data):
    d = os.path.join("fuzz", "corpus", target)
    os.makedirs(d, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    name = hashlib.sha1(data).hexdigest()
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)

def balanced(text, start):
    depth, i, in_str = 0, start, False
    while i < len(text):
        c = text[i]
        if in_str:
            if c == "\\":
                i += 1
            elif c == '"':
                in_str = False
        elif c == '"':
            in_str = True
        elif c in "{[":
            depth += 1
        elif c in "}]":
            depth -= 1
            if depth == 0:
                return text[start:i + 1]
        i += 1
    return None

def json_macros(path):
    text = open(path).read()
    for m in re.finditer(r'json!\(\s*([{\[])', text):
        body = balanced(text, m.start(1))
        if body is None:
            continue
        body = re.sub(r",(\s*[}\]])", r"\1", body)
        try:
            yield json.loads(body)
        except ValueError:
            pass

def raw_strings(path):
    for m in re.finditer(r'r#"(.*?)"#', open(path).read(), re.S):
        yield m.group(1)

# Cloud frames: every example desiredStatus, every data object and raw frame in the tests.
for f in sorted(glob.glob("examples/desired-states/*/desired.json")):
    text = open(f).read()
    put("cloud_frame", text)
    put("desired_plan", text)
for f in ["src/api/cloud/messages.rs", "src/api/cloud/desired.rs", "src/agent.rs",
          "tests/cloud_link.rs", "tests/malformed.rs", "tests/cloud_unit.rs"]:
    for v in json_macros(f):
        if isinstance(v, dict) and "messageType" in v:
            put("cloud_frame", json.dumps({"header": HEADER, "data": v}))
            if v["messageType"] == "desiredStatus":
                put("desired_plan", json.dumps({"header": HEADER, "data": v}))
        elif isinstance(v, dict) and "header" in v and "data" in v:
            v["header"]["systemId"] = SYSTEM_ID
            put("cloud_frame", json.dumps(v))
    for s in raw_strings(f):
        if "messageType" in s:
            put("cloud_frame", s.replace('"unit-1"', '"%s"' % SYSTEM_ID))

# Unit configs: the examples and the JSON objects in the unit config tests.
for f in sorted(glob.glob("examples/desired-states/*/unitconfig.json")):
    put("unit_config", open(f).read())
for f in ["src/api/cloud/unitconfig.rs", "src/reconcilers/unitconfig.rs"]:
    for v in json_macros(f):
        if isinstance(v, dict) and ("nodes" in v or "version" in v):
            put("unit_config", json.dumps(v))

# aos_cm.cfg: the samples and the config texts in the config tests.
for f in ["aos_cm.cfg.sample", "aos_cm.static.cfg.sample"]:
    put("config_file", open(f).read())
for s in raw_strings("src/config.rs"):
    if s.lstrip().startswith("{"):
        put("config_file", s)
for v in json_macros("src/config.rs"):
    if isinstance(v, dict):
        put("config_file", json.dumps(v))
