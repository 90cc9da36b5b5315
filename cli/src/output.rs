//! The one printer every command shares, with python-openstackclient's
//! conventions: `-f table|value|json|shell|yaml` and `-c COLUMN`
//! (repeatable) on any command, so that `TOKEN=$(cirrus token issue -f value
//! -c token)` works. A command hands over either a list of [`Record`]s or one
//! record (a Field / Value table); the printer selects columns and renders.
//! Tables stay readable: a cell longer than [`MAX_CELL`] characters is
//! shortened (the whole value is one `-f value -c COLUMN` away) and the table
//! wraps to the terminal (or `--max-width`, else 120 columns).

use std::fmt::Write as _;

use anyhow::bail;
use comfy_table::{ContentArrangement, Table, presets::UTF8_FULL_CONDENSED};
use serde_json::{Map, Value};

/// The longest cell a table shows whole.
pub const MAX_CELL: usize = 64;
/// The table width when neither `--max-width` nor a terminal says otherwise.
const DEFAULT_WIDTH: u16 = 120;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Default)]
pub enum Format {
    /// A table for people.
    #[default]
    Table,
    /// Bare values: one per line for one object, space-separated rows for a list.
    Value,
    /// JSON: an object, or an array of objects.
    Json,
    /// `name="value"` lines a shell can `eval` (one object only).
    Shell,
    /// YAML: a mapping, or a sequence of mappings.
    Yaml,
}

/// The output options, shared by every command (flattened into the CLI).
#[derive(clap::Args, Debug, Clone, Default)]
pub struct Printer {
    /// Output format.
    #[arg(long, short = 'f', global = true, value_enum, default_value_t = Format::Table)]
    pub format: Format,
    /// Show only this column (repeatable), e.g. `-c token`, `-c ID -c Name`.
    #[arg(long = "column", short = 'c', global = true, value_name = "COLUMN")]
    pub columns: Vec<String>,
    /// With `-f shell`: a prefix for every variable name.
    #[arg(long, global = true, default_value = "")]
    pub prefix: String,
    /// With `-f table`: the widest a table may be (default: the terminal's width, else 120).
    #[arg(long, global = true, env = "CIRRUS_MAX_WIDTH")]
    pub max_width: Option<u16>,
}

/// Something printed as one row of named columns.
pub trait Record {
    /// Column names, as a table heads them (`-c` and JSON keys accept them lower-cased, `_` for spaces).
    const COLUMNS: &'static [&'static str];
    /// This record's values, one per column.
    fn values(&self) -> Vec<String>;
}

/// Implements [`Record`] from `"Column": expression` pairs over the record
/// (bound to the name given), each printed with `to_string()`:
/// `record!(pb::Role, |r| { "ID": r.id, "Name": r.name });`
macro_rules! record {
    ($t:ty, |$v:ident| { $($col:literal: $val:expr),+ $(,)? }) => {
        impl $crate::output::Record for $t {
            const COLUMNS: &'static [&'static str] = &[$($col),+];
            fn values(&self) -> Vec<String> {
                let $v = self;
                vec![$($val.to_string()),+]
            }
        }
    };
}
pub(crate) use record;

/// Named columns and rows of values: what every command prints.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct View {
    columns: Vec<String>,
    rows: Vec<Vec<String>>,
    /// One object (a Field / Value table) rather than a list.
    one: bool,
}

impl View {
    pub fn list<'a, R: Record + 'a>(items: impl IntoIterator<Item = &'a R>) -> Self {
        Self {
            columns: R::COLUMNS.iter().map(|c| c.to_string()).collect(),
            rows: items.into_iter().map(Record::values).collect(),
            one: false,
        }
    }

    pub fn one<R: Record>(item: &R) -> Self {
        Self {
            one: true,
            ..Self::list([item])
        }
    }

    /// One object from field / value pairs.
    pub fn fields(pairs: Vec<(&str, String)>) -> Self {
        let (columns, row) = pairs.into_iter().map(|(k, v)| (k.to_string(), v)).unzip();
        Self {
            columns,
            rows: vec![row],
            one: true,
        }
    }

    /// Only the columns asked for with `-c` (in the table's order); all when none.
    fn select(self, wanted: &[String]) -> anyhow::Result<Self> {
        if wanted.is_empty() {
            return Ok(self);
        }
        if let Some(unknown) = wanted
            .iter()
            .find(|w| !self.columns.iter().any(|c| key(c) == key(w)))
        {
            bail!(
                "no column {unknown:?}; the columns are {}",
                self.columns.join(", ")
            );
        }
        let keep: Vec<usize> = (0..self.columns.len())
            .filter(|&i| wanted.iter().any(|w| key(w) == key(&self.columns[i])))
            .collect();
        let pick = |row: &[String]| keep.iter().map(|&i| row[i].clone()).collect::<Vec<_>>();
        Ok(Self {
            columns: pick(&self.columns),
            rows: self.rows.iter().map(|r| pick(r)).collect(),
            one: self.one,
        })
    }

    fn objects(&self) -> Vec<Map<String, Value>> {
        self.rows
            .iter()
            .map(|r| {
                self.columns
                    .iter()
                    .zip(r)
                    .map(|(c, v)| (key(c), Value::String(v.clone())))
                    .collect()
            })
            .collect()
    }
}

/// A column's name as a JSON key, a shell variable and a `-c` argument:
/// lower case, `_` for anything else than letters and digits.
fn key(column: &str) -> String {
    column
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .collect()
}

impl Printer {
    pub fn list<'a, R: Record + 'a>(
        &self,
        items: impl IntoIterator<Item = &'a R>,
    ) -> anyhow::Result<()> {
        self.print(View::list(items))
    }

    pub fn one<R: Record>(&self, item: &R) -> anyhow::Result<()> {
        self.print(View::one(item))
    }

    pub fn print(&self, view: View) -> anyhow::Result<()> {
        let (text, shortened) = self.render(view)?;
        print!("{text}");
        if shortened {
            eprintln!(
                "(long values are shortened in tables; `-f value -c COLUMN` prints one whole)"
            );
        }
        Ok(())
    }

    /// A message saying what a command did (`deleted user alice`): on stdout
    /// beside tables, on stderr when stdout is for a script.
    pub fn done(&self, message: &str) {
        if self.format == Format::Table {
            println!("{message}");
        } else {
            eprintln!("{message}");
        }
    }

    /// The text to print, and whether a table had to shorten a value.
    fn render(&self, view: View) -> anyhow::Result<(String, bool)> {
        let view = view.select(&self.columns)?;
        let mut out = String::new();
        let mut shortened = false;
        match self.format {
            Format::Table => {
                let mut t = Table::new();
                t.load_preset(UTF8_FULL_CONDENSED)
                    .set_content_arrangement(ContentArrangement::Dynamic);
                match self.max_width {
                    Some(w) => {
                        t.set_width(w);
                    }
                    None if t.width().is_none() => {
                        t.set_width(DEFAULT_WIDTH);
                    }
                    None => {}
                }
                let mut cell = |v: &String| {
                    let (c, cut) = shorten(v);
                    shortened |= cut;
                    c
                };
                if view.one {
                    t.set_header(["Field", "Value"]);
                    if let Some(r) = view.rows.first() {
                        for (c, v) in view.columns.iter().zip(r) {
                            t.add_row([c.clone(), cell(v)]);
                        }
                    }
                } else {
                    t.set_header(view.columns.clone());
                    for r in &view.rows {
                        t.add_row(r.iter().map(&mut cell).collect::<Vec<_>>());
                    }
                }
                writeln!(out, "{t}")?;
            }
            Format::Value if view.one => {
                for v in view.rows.iter().flatten() {
                    writeln!(out, "{v}")?;
                }
            }
            Format::Value => {
                for r in &view.rows {
                    writeln!(out, "{}", r.join(" "))?;
                }
            }
            Format::Json => {
                let mut objects = view.objects().into_iter().map(Value::Object);
                let v = if view.one {
                    objects.next().unwrap_or_default()
                } else {
                    Value::Array(objects.collect())
                };
                writeln!(out, "{v}")?;
            }
            Format::Shell if view.one => {
                for (k, v) in view.objects().into_iter().flatten() {
                    let v = v.as_str().unwrap_or_default();
                    writeln!(out, "{}{k}=\"{}\"", self.prefix, shell_escape(v))?;
                }
            }
            Format::Shell => {
                bail!("-f shell prints one object; this command lists: use -f value, json or yaml")
            }
            Format::Yaml => {
                let objects = view.objects();
                if !view.one && objects.is_empty() {
                    writeln!(out, "[]")?;
                }
                for o in objects {
                    for (i, (k, v)) in o.into_iter().enumerate() {
                        // A JSON string is a YAML scalar, quoted and escaped.
                        let lead = match (view.one, i) {
                            (true, _) => "",
                            (false, 0) => "- ",
                            (false, _) => "  ",
                        };
                        writeln!(out, "{lead}{k}: {v}")?;
                    }
                }
            }
        }
        Ok((out, shortened))
    }
}

/// A cell for a table: whole if short, else its start and `…`.
fn shorten(v: &str) -> (String, bool) {
    if v.chars().count() <= MAX_CELL {
        return (v.to_string(), false);
    }
    let head: String = v.chars().take(MAX_CELL - 1).collect();
    (format!("{head}…"), true)
}

/// Escapes what a double-quoted shell word would expand.
fn shell_escape(v: &str) -> String {
    let mut s = String::with_capacity(v.len());
    for c in v.chars() {
        if matches!(c, '"' | '\\' | '$' | '`') {
            s.push('\\');
        }
        s.push(c);
    }
    s
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    struct Thing(&'static str, &'static str);
    impl Record for Thing {
        const COLUMNS: &'static [&'static str] = &["ID", "Long Name"];
        fn values(&self) -> Vec<String> {
            vec![self.0.into(), self.1.into()]
        }
    }

    fn render(format: Format, columns: &[&str], view: View) -> anyhow::Result<String> {
        let p = Printer {
            format,
            columns: columns.iter().map(|c| c.to_string()).collect(),
            max_width: Some(100),
            ..Default::default()
        };
        p.render(view).map(|(s, _)| s)
    }

    fn things() -> View {
        View::list(&[Thing("1", "one"), Thing("2", "two \"$x\"")])
    }

    #[test]
    fn value_prints_bare_values_of_the_chosen_columns() {
        let token = View::fields(vec![
            ("token", "v4.public.abc".into()),
            ("roles", "admin".into()),
        ]);
        assert_eq!(
            render(Format::Value, &["token"], token.clone()).unwrap(),
            "v4.public.abc\n"
        );
        assert_eq!(
            render(Format::Value, &[], token).unwrap(),
            "v4.public.abc\nadmin\n"
        );
        assert_eq!(
            render(Format::Value, &["long_name"], things()).unwrap(),
            "one\ntwo \"$x\"\n"
        );
        assert_eq!(
            render(Format::Value, &["Long Name", "id"], things()).unwrap(),
            "1 one\n2 two \"$x\"\n"
        );
    }

    #[test]
    fn json_and_yaml_use_snake_case_keys() {
        assert_eq!(
            render(Format::Json, &[], things()).unwrap(),
            "[{\"id\":\"1\",\"long_name\":\"one\"},{\"id\":\"2\",\"long_name\":\"two \\\"$x\\\"\"}]\n"
        );
        assert_eq!(
            render(Format::Json, &["id"], View::one(&Thing("1", "one"))).unwrap(),
            "{\"id\":\"1\"}\n"
        );
        assert_eq!(
            render(Format::Yaml, &[], things()).unwrap(),
            "- id: \"1\"\n  long_name: \"one\"\n- id: \"2\"\n  long_name: \"two \\\"$x\\\"\"\n"
        );
        assert_eq!(
            render(Format::Yaml, &[], View::list::<Thing>(&[])).unwrap(),
            "[]\n"
        );
    }

    #[test]
    fn shell_lines_survive_eval() {
        let v = View::one(&Thing("1", "a \"b\" $HOME `x` \\"));
        assert_eq!(
            render(Format::Shell, &[], v.clone()).unwrap(),
            "id=\"1\"\nlong_name=\"a \\\"b\\\" \\$HOME \\`x\\` \\\\\"\n"
        );
        let p = Printer {
            format: Format::Shell,
            prefix: "os_".into(),
            ..Default::default()
        };
        assert!(p.render(v).unwrap().0.starts_with("os_id=\"1\"\n"));
        let err = render(Format::Shell, &[], things())
            .unwrap_err()
            .to_string();
        assert!(err.contains("one object"), "{err}");
    }

    #[test]
    fn an_unknown_column_is_refused_with_the_known_ones() {
        let err = render(Format::Value, &["id", "nope"], things())
            .unwrap_err()
            .to_string();
        assert_eq!(err, "no column \"nope\"; the columns are ID, Long Name");
    }

    #[test]
    fn tables_shorten_long_values_and_keep_their_width() {
        let long = "x".repeat(900);
        let p = Printer {
            max_width: Some(100),
            ..Default::default()
        };
        let (text, shortened) = p
            .render(View::fields(vec![
                ("token", long.clone()),
                ("roles", "admin".into()),
            ]))
            .unwrap();
        assert!(shortened);
        assert!(text.contains("roles") && text.contains('…'), "{text}");
        assert!(!text.contains(&long));
        assert!(text.lines().all(|l| l.chars().count() <= 100), "{text}");
        let (text, shortened) = p.render(things()).unwrap();
        assert!(!shortened);
        assert!(
            text.contains("Long Name") && text.contains("two \"$x\""),
            "{text}"
        );
    }
}
