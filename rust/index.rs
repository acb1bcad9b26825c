//! The shard index (`<weights>.safetensors.index.json`): `{"metadata": {...}, "weight_map": {...}}`
//! rendered byte for byte like Python's `json.dumps(index, indent=2, sort_keys=True) + "\n"`
//! (ASCII escapes included). Knows nothing about files or Python.

use std::collections::BTreeMap;

use serde_json::Value;

/// Renders the index for `metadata` (at least `total_size`) and `weight_map` (tensor -> file).
pub fn render_index(
    metadata: &BTreeMap<String, Value>,
    weight_map: &BTreeMap<String, String>,
) -> String {
    let mut root = serde_json::Map::new();
    root.insert(
        "metadata".into(),
        Value::Object(
            metadata
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        ),
    );
    root.insert(
        "weight_map".into(),
        Value::Object(
            weight_map
                .iter()
                .map(|(k, v)| (k.clone(), Value::String(v.clone())))
                .collect(),
        ),
    );
    let mut out = String::new();
    dump_python(&Value::Object(root), 0, &mut out);
    out.push('\n');
    out
}

/// Writes `v` the way `json.dumps(v, indent=2, sort_keys=True)` does.
pub fn dump_python(v: &Value, level: usize, out: &mut String) {
    match v {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => out.push_str(&python_number(n)),
        Value::String(s) => push_ascii_str(s, out),
        Value::Array(a) if a.is_empty() => out.push_str("[]"),
        Value::Object(o) if o.is_empty() => out.push_str("{}"),
        Value::Array(a) => {
            out.push('[');
            for (i, x) in a.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                newline(level + 1, out);
                dump_python(x, level + 1, out);
            }
            newline(level, out);
            out.push(']');
        }
        Value::Object(o) => {
            let mut keys: Vec<&String> = o.keys().collect();
            keys.sort();
            out.push('{');
            for (i, k) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                newline(level + 1, out);
                push_ascii_str(k, out);
                out.push_str(": ");
                dump_python(&o[k], level + 1, out);
            }
            newline(level, out);
            out.push('}');
        }
    }
}

fn newline(level: usize, out: &mut String) {
    out.push('\n');
    for _ in 0..level {
        out.push_str("  ");
    }
}

fn python_number(n: &serde_json::Number) -> String {
    if let Some(i) = n.as_i64() {
        return i.to_string();
    }
    if let Some(u) = n.as_u64() {
        return u.to_string();
    }
    let f = n.as_f64().unwrap_or(f64::NAN);
    // Python's repr: shortest round-trip digits, exponent form below 1e-4 or from 1e16.
    let abs = f.abs();
    if abs != 0.0 && !(1e-4..1e16).contains(&abs) {
        let s = format!("{f:e}");
        let (mant, exp) = s.split_once('e').unwrap_or((&s, "0"));
        let exp: i32 = exp.parse().unwrap_or(0);
        let sign = if exp < 0 { '-' } else { '+' };
        return format!("{mant}e{sign}{:02}", exp.abs());
    }
    format!("{f:?}")
}

/// Appends `s` as a JSON string with non-ASCII characters escaped (`ensure_ascii=True`).
fn push_ascii_str(s: &str, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 || (c as u32) > 0x7e => {
                let mut buf = [0u16; 2];
                for unit in c.encode_utf16(&mut buf) {
                    out.push_str(&format!("\\u{unit:04x}"));
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}
