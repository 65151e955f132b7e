//! `--set KEY=VALUE`: config overrides from the command line. KEY is a dotted TOML path
//! (`diffusion.parameterization`, `backbone`), VALUE a TOML value (`0.5`, `true`, `[1, 2]`,
//! `{kind = "min-snr", gamma = 5.0}`, `"text"`); a bare word that is not TOML (`v`, `cosine`)
//! is read as a string. Each setting replaces the value at its path in the parsed file
//! (a whole table when VALUE is an inline table), in order, before the typed config is
//! deserialized, so unknown keys and wrong types are refused as in a file.

use std::path::Path;

use anyhow::{Context, Result, anyhow, bail};
use serde::de::DeserializeOwned;
use toml::{Table, Value};

/// One `--set`: the path of the key and the value put there.
#[derive(Debug, Clone, PartialEq)]
pub struct Setting {
    /// The flag as given, for error messages.
    pub arg: String,
    pub path: Vec<String>,
    pub value: Value,
}

impl Setting {
    /// Parses `KEY=VALUE` (whitespace around `=` allowed).
    pub fn parse(arg: &str) -> Result<Self> {
        let Some((key, value)) = arg.split_once('=') else {
            bail!("--set {arg}: expected KEY=VALUE, e.g. --set diffusion.parameterization=v");
        };
        let path = parse_key(key.trim()).ok_or_else(|| {
            anyhow!(
                "--set {arg}: {:?} is not a dotted TOML key such as diffusion.parameterization",
                key.trim()
            )
        })?;
        let value = parse_value(value.trim()).map_err(|e| anyhow!("--set {arg}: {e}"))?;
        Ok(Self {
            arg: arg.to_string(),
            path,
            value,
        })
    }

    /// The dotted key, e.g. `diffusion.loss`.
    pub fn key(&self) -> String {
        self.path.join(".")
    }

    /// Puts the value at the path, creating missing tables on the way; a path through a value
    /// that is not a table is refused.
    pub fn apply(&self, table: &mut Table) -> Result<()> {
        let (last, parents) = self.path.split_last().expect("a parsed key has a segment");
        let mut at = table;
        for (depth, segment) in parents.iter().enumerate() {
            let entry = at
                .entry(segment.clone())
                .or_insert_with(|| Value::Table(Table::new()));
            at = match entry {
                Value::Table(t) => t,
                other => bail!(
                    "--set {}: {} is {} ({other}), not a table with keys",
                    self.arg,
                    self.path[..=depth].join("."),
                    a_type(other)
                ),
            };
        }
        at.insert(last.clone(), self.value.clone());
        Ok(())
    }
}

/// The segments of a dotted TOML key (bare or quoted), or `None` if `key` is not one: the key
/// is read by the TOML parser as `KEY = 0`, which must give one chain of single-key tables.
fn parse_key(key: &str) -> Option<Vec<String>> {
    if key.is_empty() || key.contains(['\n', '\r', '#']) {
        return None;
    }
    let mut table: Table = format!("{key} = 0").parse().ok()?;
    let mut path = Vec::new();
    loop {
        if table.len() != 1 {
            return None;
        }
        let (k, v) = table.into_iter().next()?;
        path.push(k);
        match v {
            Value::Table(t) => table = t,
            Value::Integer(0) => return Some(path),
            _ => return None,
        }
    }
}

/// A TOML value; a bare word that is not valid TOML (`v`, `cosine`, `DiT-S/2`) is a string.
fn parse_value(text: &str) -> Result<Value, String> {
    match text.parse::<Value>() {
        Ok(v) => Ok(v),
        Err(_) if !text.starts_with(['[', '{', '"', '\'']) && !text.contains(['\n', '\r']) => {
            Ok(Value::String(text.to_string()))
        }
        Err(e) => Err(format!(
            "{text:?} is not a TOML value ({})",
            e.message().trim().replace('\n', " ")
        )),
    }
}

fn a_type(v: &Value) -> &'static str {
    match v {
        Value::String(_) => "a string",
        Value::Integer(_) => "an integer",
        Value::Float(_) => "a float",
        Value::Boolean(_) => "a boolean",
        Value::Datetime(_) => "a datetime",
        Value::Array(_) => "an array",
        Value::Table(_) => "a table",
    }
}

/// Reads the config file `path` into `T` with the `--set` flags applied in order. Errors in
/// the file name its line; errors the settings cause name the setting and the key.
pub fn read<T: DeserializeOwned>(path: &Path, sets: &[String]) -> Result<T> {
    let config: T = crate::config::read(path)?;
    if sets.is_empty() {
        return Ok(config);
    }
    let settings = sets
        .iter()
        .map(|s| Setting::parse(s))
        .collect::<Result<Vec<_>>>()?;
    let text = std::fs::read_to_string(path).with_context(|| format!("{}", path.display()))?;
    let mut table: Table = text
        .parse()
        .map_err(|e: toml::de::Error| anyhow!("{}: {}", path.display(), e.message()))?;
    for s in &settings {
        s.apply(&mut table)?;
    }
    deserialize(&table, &settings)
}

/// Deserializes the merged table. An error is traced to its key through the span in the
/// table's TOML text, and to the last setting on that key's path.
fn deserialize<T: DeserializeOwned>(table: &Table, settings: &[Setting]) -> Result<T> {
    let text = toml::to_string(table).context("writing the merged config")?;
    let err = match toml::from_str::<T>(&text) {
        Ok(config) => return Ok(config),
        Err(e) => e,
    };
    let message = err.message().trim().replace('\n', " ");
    let key = err.span().map(|s| key_at(&text, s.start));
    let culprit = key.as_deref().and_then(|k| {
        let k: Vec<&str> = k.split('.').collect();
        settings.iter().rev().find(|s| {
            let n = s.path.len().min(k.len());
            s.path[..n].iter().zip(&k[..n]).all(|(a, b)| a == b)
        })
    });
    let sets: Vec<&str> = settings.iter().map(|s| s.arg.as_str()).collect();
    Err(match (culprit, key) {
        (Some(s), Some(k)) => anyhow!("--set {}: {k}: {message}", s.arg),
        (None, Some(k)) => anyhow!(
            "the config with --set {}: {k}: {message}",
            sets.join(" --set ")
        ),
        (_, None) => anyhow!("the config with --set {}: {message}", sets.join(" --set ")),
    })
}

/// The dotted key of the TOML line holding byte `offset` of `text`: the last `[table]` header
/// above it, then the key before ` = ` (a header line is its own key).
fn key_at(text: &str, offset: usize) -> String {
    let offset = offset.min(text.len());
    let start = text[..offset].rfind('\n').map_or(0, |i| i + 1);
    let line = text[start..].lines().next().unwrap_or("").trim();
    let header_of = |l: &str| {
        l.trim()
            .strip_prefix('[')
            .and_then(|l| l.strip_suffix(']'))
            .map(|h| h.trim_matches(['[', ']']).trim().to_string())
    };
    if let Some(h) = header_of(line) {
        return h;
    }
    let key = line.split_once('=').map_or(line, |(k, _)| k).trim();
    let header = text[..start].lines().rev().find_map(header_of);
    match header {
        Some(h) if !key.is_empty() => format!("{h}.{key}"),
        Some(h) => h,
        None => key.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Inner {
        #[serde(default)]
        kind: String,
        #[serde(default)]
        gamma: f64,
        #[serde(default)]
        list: Vec<usize>,
    }

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Outer {
        #[serde(default)]
        steps: u64,
        inner: Inner,
        #[serde(default)]
        flag: bool,
    }

    fn file(text: &str) -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, text).unwrap();
        (dir, path)
    }

    fn sets(s: &[&str]) -> Vec<String> {
        s.iter().map(|s| s.to_string()).collect()
    }

    const BASE: &str = "steps = 3\n[inner]\nkind = \"a\"\ngamma = 1.0\n";

    #[test]
    fn values_are_toml_and_bare_words_are_strings() {
        let v = |s: &str| Setting::parse(&format!("k={s}")).unwrap().value;
        assert_eq!(v("5"), Value::Integer(5));
        assert_eq!(v(" 1e-4 "), Value::Float(1e-4));
        assert_eq!(v("true"), Value::Boolean(true));
        assert_eq!(v("v"), Value::String("v".into()));
        assert_eq!(v("DiT-S/2"), Value::String("DiT-S/2".into()));
        assert_eq!(v("\"007\""), Value::String("007".into()));
        assert_eq!(
            v("[1, 2]"),
            Value::Array(vec![Value::Integer(1), Value::Integer(2)])
        );
        let t = v("{kind=\"min-snr\",gamma=5.0}");
        assert_eq!(t["kind"].as_str(), Some("min-snr"));
        assert_eq!(t["gamma"].as_float(), Some(5.0));
        // what looks like TOML but is broken is an error, not a string
        let e = Setting::parse("k=[1, 2").unwrap_err().to_string();
        assert!(
            e.starts_with("--set k=[1, 2: \"[1, 2\" is not a TOML value"),
            "{e}"
        );
    }

    #[test]
    fn keys_are_dotted_paths() {
        let p = |s: &str| Setting::parse(s).map(|s| s.path);
        assert_eq!(p("a.b.c=1").unwrap(), ["a", "b", "c"]);
        assert_eq!(p(" a . b = 1").unwrap(), ["a", "b"]);
        assert_eq!(p("\"x.y\".z=1").unwrap(), ["x.y", "z"]);
        for bad in ["=1", "a..b=1", "a b=1", ".a=1", "a.=1"] {
            let e = p(bad).unwrap_err().to_string();
            assert!(e.contains("is not a dotted TOML key"), "{bad}: {e}");
        }
        let e = p("diffusion.parameterization").unwrap_err().to_string();
        assert_eq!(
            e,
            "--set diffusion.parameterization: expected KEY=VALUE, e.g. --set diffusion.parameterization=v"
        );
    }

    #[test]
    fn settings_replace_values_and_whole_tables_in_order() {
        let (_d, path) = file(BASE);
        let c: Outer = read(&path, &[]).unwrap();
        assert_eq!((c.steps, c.inner.gamma), (3, 1.0));
        let c: Outer = read(&path, &sets(&["inner.gamma=5", "steps=9", "steps=10"])).unwrap();
        assert_eq!(
            (c.steps, c.inner.kind.as_str(), c.inner.gamma),
            (10, "a", 5.0)
        );
        // an inline table replaces the whole table: gamma falls back to its default
        let c: Outer = read(&path, &sets(&["inner={kind=\"b\", list=[1, 2]}"])).unwrap();
        assert_eq!(
            c.inner,
            Inner {
                kind: "b".into(),
                gamma: 0.0,
                list: vec![1, 2]
            }
        );
        // a key the file leaves out is added
        let c: Outer = read(&path, &sets(&["flag=true"])).unwrap();
        assert!(c.flag);
    }

    #[test]
    fn errors_name_the_setting_and_the_key() {
        let (_d, path) = file(BASE);
        let err = |s: &[&str]| read::<Outer>(&path, &sets(s)).unwrap_err().to_string();
        let e = err(&["inner.gama=5"]);
        assert!(
            e.starts_with("--set inner.gama=5: inner.gama: unknown field `gama`, expected one of"),
            "{e}"
        );
        let e = err(&["steps=7", "stepz=7"]);
        assert!(
            e.starts_with("--set stepz=7: stepz: unknown field `stepz`"),
            "{e}"
        );
        let e = err(&["inner.gamma=fast"]);
        assert!(
            e.starts_with("--set inner.gamma=fast: inner.gamma: "),
            "{e}"
        );
        assert!(e.contains("expected f64"), "{e}");
        let e = err(&["steps.x=1"]);
        assert_eq!(
            e,
            "--set steps.x=1: steps is an integer (3), not a table with keys"
        );
        let e = err(&["inner=5"]);
        assert!(e.starts_with("--set inner=5: inner: "), "{e}");
        // the file's own errors still name the file's line
        let (_d2, bad) = file("steps = 3\n[inner]\nkindd = 1\n");
        let e = read::<Outer>(&bad, &sets(&["steps=1"])).unwrap_err();
        assert!(format!("{e:#}").contains("line 3"), "{e:#}");
    }

    #[test]
    fn key_at_finds_the_header_and_the_key() {
        let text = "a = 1\n\n[x.y]\nb = 2\nc = { d = 1 }\n";
        assert_eq!(key_at(text, 1), "a");
        assert_eq!(key_at(text, text.find("b =").unwrap()), "x.y.b");
        assert_eq!(key_at(text, text.find("d =").unwrap()), "x.y.c");
        assert_eq!(key_at(text, text.find("[x").unwrap()), "x.y");
    }
}
