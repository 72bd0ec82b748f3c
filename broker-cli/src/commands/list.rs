//! `broker list`: the backends linked into this program.

use std::io::Write;

use clap::Args;
use micro_broker::Plugin;
use serde::Serialize;

use crate::error::CliError;

/// Arguments of `broker list`.
#[derive(Debug, Args)]
pub(crate) struct ListArgs {
    /// Print a JSON array of {name, description, capabilities} instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Serialize)]
struct Entry<'a> {
    name: &'a str,
    description: &'a str,
    capabilities: Vec<&'static str>,
}

/// Prints one line per linked backend: name, description, capabilities.
pub(crate) fn run(args: &ListArgs) -> Result<(), CliError> {
    let plugins = micro_broker::available();
    let text = if args.json { json(&plugins)? } else { table(&plugins) };
    let mut out = std::io::stdout().lock();
    writeln!(out, "{text}").and_then(|()| out.flush()).map_err(|e| CliError::io("cannot write to standard output", e))
}

fn json(plugins: &[&Plugin]) -> Result<String, CliError> {
    let entries: Vec<Entry<'_>> = plugins
        .iter()
        .map(|p| Entry { name: p.name, description: p.description, capabilities: p.capabilities.names() })
        .collect();
    serde_json::to_string_pretty(&entries)
        .map_err(|e| CliError::Failed(format!("cannot encode the backend list as JSON: {e}")))
}

fn table(plugins: &[&Plugin]) -> String {
    let name_width = plugins.iter().map(|p| p.name.len()).max().unwrap_or(0);
    let description_width = plugins.iter().map(|p| p.description.chars().count()).max().unwrap_or(0);
    let lines: Vec<String> = plugins
        .iter()
        .map(|p| {
            let names = p.capabilities.names();
            let capabilities = if names.is_empty() { "none".to_string() } else { names.join(", ") };
            format!(
                "{name:<name_width$}  {description:<description_width$}  capabilities: {capabilities}",
                name = p.name,
                description = p.description
            )
        })
        .collect();
    lines.join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_is_listed_in_both_forms() {
        let plugins = micro_broker::available();
        let text = table(&plugins);
        assert!(text.lines().any(|l| l.starts_with("memory ") && l.contains("capabilities: ")), "{text}");
        let value: serde_json::Value = serde_json::from_str(&json(&plugins).unwrap()).unwrap();
        let memory = value.as_array().unwrap().iter().find(|e| e["name"] == "memory").unwrap();
        assert!(memory["capabilities"].is_array() && memory["description"].is_string());
    }
}
