//! How the CLI prints: tables for people, JSON (`-f json`) for scripts.

use comfy_table::{ContentArrangement, Table, presets::UTF8_FULL_CONDENSED};
use serde_json::{Map, Value};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Default)]
pub enum Format {
    #[default]
    Table,
    Json,
}

/// Rows of named columns.
pub struct Rows {
    pub columns: Vec<&'static str>,
    pub rows: Vec<Vec<String>>,
}

impl Rows {
    pub fn new(columns: &[&'static str]) -> Self {
        Self {
            columns: columns.to_vec(),
            rows: Vec::new(),
        }
    }

    pub fn push(&mut self, row: Vec<String>) {
        self.rows.push(row);
    }

    fn objects(&self) -> Vec<Value> {
        self.rows
            .iter()
            .map(|r| {
                let mut m = Map::new();
                for (c, v) in self.columns.iter().zip(r) {
                    m.insert(c.to_lowercase().replace(' ', "_"), Value::String(v.clone()));
                }
                Value::Object(m)
            })
            .collect()
    }

    /// A list: one row per object.
    pub fn print_list(&self, f: Format) {
        match f {
            Format::Json => println!("{}", Value::Array(self.objects())),
            Format::Table => {
                let mut t = Table::new();
                t.load_preset(UTF8_FULL_CONDENSED)
                    .set_content_arrangement(ContentArrangement::Dynamic)
                    .set_header(self.columns.clone());
                for r in &self.rows {
                    t.add_row(r.clone());
                }
                println!("{t}");
            }
        }
    }

    /// One object: a Field / Value table.
    pub fn print_one(&self, f: Format) {
        match f {
            Format::Json => {
                let obj = self.objects().into_iter().next().unwrap_or(Value::Null);
                println!("{obj}");
            }
            Format::Table => {
                let mut t = Table::new();
                t.load_preset(UTF8_FULL_CONDENSED)
                    .set_content_arrangement(ContentArrangement::Dynamic)
                    .set_header(["Field", "Value"]);
                if let Some(r) = self.rows.first() {
                    for (c, v) in self.columns.iter().zip(r) {
                        t.add_row([c.to_string(), v.clone()]);
                    }
                }
                println!("{t}");
            }
        }
    }
}

/// One object from field/value pairs.
pub fn one(pairs: &[(&'static str, String)], f: Format) {
    let mut rows = Rows::new(&pairs.iter().map(|(k, _)| *k).collect::<Vec<_>>());
    rows.push(pairs.iter().map(|(_, v)| v.clone()).collect());
    rows.print_one(f);
}
