//! One ticket-tracker schema: the base rules
//! (`crates/ferry-server/examples/ticket-tracker.toml`) are the only place
//! that declares the tracker's tables, buckets and permissions. The rules
//! of every strategy (`examples/tracker-*.toml`) extend them and add only
//! their strategies and the columns declared in [`added_columns`]; the
//! examples (`TrackerRules::load`), the server (`SyncRules::from_file`), the
//! tracker app (`tracker::client_schema`) and its page all derive the same
//! tables from them. These tests fail when a copy drifts again.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use anyhow::{ensure, Context as _, Result};
use ferry_conflict::StrategyConfig;
use ferry_core::{ColumnType, Schema};
use ferry_examples::{client_schema, tracker, TrackerRules};
use ferry_server::{RulesFile, SyncRules};

fn workspace() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().unwrap_or(manifest).to_path_buf()
}

/// The columns a variant adds to the base rules' tables: the only
/// difference between the strategies' schemas.
fn added_columns(rules: TrackerRules) -> Vec<(&'static str, &'static str, ColumnType)> {
    match rules {
        TrackerRules::Base | TrackerRules::Strategies => Vec::new(),
        TrackerRules::Crdt => vec![("tickets", tracker::DESCRIPTION_DOC, ColumnType::Blob)],
    }
}

type Tables = BTreeMap<String, Vec<(String, ColumnType)>>;

fn tables(schema: &Schema) -> Tables {
    schema
        .tables()
        .map(|t| {
            let columns = t.columns.iter().map(|c| (c.name.clone(), c.ty)).collect();
            (t.name.clone(), columns)
        })
        .collect()
}

/// `schema`'s tables without the columns `rules` declares as its own,
/// checking that each of them is there.
fn without_added(rules: TrackerRules, schema: &Schema) -> Result<Tables> {
    let mut tables = tables(schema);
    for (table, column, ty) in added_columns(rules) {
        let columns = tables
            .get_mut(table)
            .with_context(|| format!("{rules:?}: no table {table}"))?;
        let before = columns.len();
        columns.retain(|c| *c != (column.to_owned(), ty));
        ensure!(
            columns.len() + 1 == before,
            "{rules:?}: {table}.{column} ({ty:?}) is missing"
        );
    }
    Ok(tables)
}

#[test]
fn every_strategy_has_the_base_tables_plus_only_its_declared_columns() -> Result<()> {
    let base = TrackerRules::Base.load()?;
    let base_client = tables(&base.client_schema());
    ensure!(base_client.contains_key("app_user"), "the users table is app_user");
    for variant in TrackerRules::ALL {
        let rules = variant.load()?;
        assert_eq!(
            without_added(variant, &rules.client_schema())?,
            base_client,
            "{variant:?}: client schema"
        );
        assert_eq!(
            without_added(variant, rules.schema())?,
            tables(base.schema()),
            "{variant:?}: server schema"
        );
        assert_eq!(
            format!("{:?}", rules.buckets()),
            format!("{:?}", base.buckets()),
            "{variant:?}: buckets"
        );
        assert_eq!(
            rules.writable_tables(),
            base.writable_tables(),
            "{variant:?}: permissions"
        );
        // The examples' and the tracker's client schema is derived from it.
        assert_eq!(
            without_added(variant, &client_schema(&rules)?)?,
            base_client,
            "{variant:?}: the apps' client schema"
        );
    }
    Ok(())
}

#[test]
fn each_strategy_file_only_extends_the_base() -> Result<()> {
    let base = RulesFile::from_toml(TrackerRules::Base.text())?;
    ensure!(base.extends.is_none(), "the base extends nothing");
    ensure!(base.strategies.is_empty(), "the base sets no strategy");
    for variant in [TrackerRules::Strategies, TrackerRules::Crdt] {
        let file = RulesFile::from_toml(variant.text())?;
        assert_eq!(
            file.extends.as_deref(),
            Some("../crates/ferry-server/examples/ticket-tracker.toml"),
            "{variant:?}"
        );
        ensure!(
            file.tables.is_empty() && file.buckets.is_empty() && file.permissions.is_empty(),
            "{}: declares tables, buckets or permissions of its own (add them to {})",
            variant.path(),
            TrackerRules::Base.path()
        );
        let added: Vec<(String, String, ColumnType)> = file
            .add_columns
            .iter()
            .flat_map(|a| a.columns.iter().map(|c| (a.table.clone(), c.name.clone(), c.ty)))
            .collect();
        let declared: Vec<(String, String, ColumnType)> = added_columns(variant)
            .into_iter()
            .map(|(t, c, ty)| (t.to_owned(), c.to_owned(), ty))
            .collect();
        assert_eq!(added, declared, "{variant:?}: added columns");
    }
    Ok(())
}

#[test]
fn each_strategy_file_sets_its_strategy_on_tickets() -> Result<()> {
    let strategies = |v: TrackerRules| -> Result<Vec<(String, bool, StrategyConfig)>> {
        Ok(v.load()?
            .strategies()
            .iter()
            .map(|s| (s.table.clone(), s.audit, s.strategy.clone()))
            .collect())
    };
    ensure!(strategies(TrackerRules::Base)?.is_empty());
    let s = strategies(TrackerRules::Strategies)?;
    ensure!(
        matches!(s.as_slice(), [(t, true, StrategyConfig::Domain { .. })] if t == "tickets"),
        "{s:?}"
    );
    let s = strategies(TrackerRules::Crdt)?;
    ensure!(
        matches!(s.as_slice(), [(t, false, StrategyConfig::Crdt { columns, .. })]
            if t == "tickets" && columns == &[tracker::DESCRIPTION_DOC.to_owned()]),
        "{s:?}"
    );
    Ok(())
}

#[test]
fn the_embedded_rules_are_what_the_server_loads_from_the_files() -> Result<()> {
    for variant in TrackerRules::ALL {
        let path = workspace().join(variant.path());
        let text = std::fs::read_to_string(&path).with_context(|| path.display().to_string())?;
        assert_eq!(text, variant.text(), "{variant:?}: embedded text");
        let from_file = SyncRules::from_file(&path)?;
        let embedded = variant.load()?;
        assert_eq!(from_file.schema(), embedded.schema(), "{variant:?}");
        assert_eq!(from_file.client_schema(), embedded.client_schema(), "{variant:?}");
        assert_eq!(from_file.strategies(), embedded.strategies(), "{variant:?}");
        assert_eq!(
            format!("{:?}", from_file.buckets()),
            format!("{:?}", embedded.buckets()),
            "{variant:?}"
        );
    }
    assert_eq!(
        TrackerRules::Base.load()?.schema(),
        SyncRules::ticket_tracker()?.schema(),
        "the server's default rules are the base"
    );
    Ok(())
}

#[test]
fn only_the_crdt_rules_switch_the_tracker_to_description_documents() -> Result<()> {
    let default = tracker::client_schema(None)?;
    assert_eq!(default, client_schema(&TrackerRules::Base.load()?)?);
    ensure!(!tracker::crdt_description(&default));
    for variant in TrackerRules::ALL {
        let schema = tracker::client_schema(Some(&workspace().join(variant.path())))?;
        assert_eq!(schema, client_schema(&variant.load()?)?, "{variant:?}");
        assert_eq!(
            tracker::crdt_description(&schema),
            variant == TrackerRules::Crdt,
            "{variant:?}"
        );
    }
    Ok(())
}

#[test]
fn the_tracker_and_its_page_show_the_tables_the_rules_sync() -> Result<()> {
    let synced: BTreeSet<String> = tables(&TrackerRules::Base.load()?.client_schema())
        .into_keys()
        .collect();
    let shown: BTreeSet<String> = tracker::TABLES.iter().map(|t| (*t).to_owned()).collect();
    assert_eq!(shown, synced, "tracker::TABLES");
    let app = std::fs::read_to_string(workspace().join("examples/src/tracker/assets/app.js"))?;
    let line = app
        .lines()
        .find_map(|l| l.strip_prefix("const TABLES = ["))
        .context("app.js declares its TABLES")?;
    let page: Vec<String> = line
        .trim_end_matches("];")
        .split(',')
        .map(|t| t.trim().trim_matches('"').to_owned())
        .collect();
    assert_eq!(page, tracker::TABLES, "app.js TABLES");
    Ok(())
}

/// Files of the examples crate and of ferry-server's examples that declare
/// the tracker's tables: only the base may.
#[test]
fn no_other_file_declares_the_tracker_tables() -> Result<()> {
    let root = workspace();
    // Spelled apart so that this file does not match itself.
    let tables_header = format!("[[{}]]", "tables");
    let tickets = format!("name = \"{}\"", "tickets");
    let mut found = Vec::new();
    let mut dirs = vec![root.join("examples"), root.join("crates/ferry-server/examples")];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).with_context(|| dir.display().to_string())? {
            let path = entry?.path();
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            if path.is_dir() {
                if name != "node_modules" && name != "target" {
                    dirs.push(path);
                }
                continue;
            }
            if !(name.ends_with(".toml") || name.ends_with(".rs")) {
                continue;
            }
            let text = std::fs::read_to_string(&path)?;
            if text.contains(&tables_header) && text.contains(&tickets) {
                found.push(path.strip_prefix(&root).unwrap_or(&path).display().to_string());
            }
        }
    }
    assert_eq!(found, [TrackerRules::Base.path()], "copies of the tracker's tables");
    Ok(())
}
