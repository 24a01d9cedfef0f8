//! The sync rules file the server reads from disk.

use ferry_core::RowData;
use ferry_server::rules::RulesFile;
use ferry_server::SyncRules;

/// Sync rules TOML: `SyncRules::from_toml` never panics; rules that
/// validate serialize back to TOML (`RulesFile` is what the file holds)
/// that validates to the same schema, buckets, strategies and per-op
/// outcome tables; placing an empty row in buckets never panics.
pub fn sync_rules(data: &[u8]) {
    // The server reads the file as UTF-8 text first.
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(rules) = SyncRules::from_toml(text) else { return };
    let file: RulesFile = match toml::from_str(text) {
        Ok(f) => f,
        Err(e) => panic!("rules validated but their file does not parse: {e}"),
    };
    let again = match toml::to_string(&file) {
        Ok(t) => t,
        Err(e) => panic!("validated rules do not serialize to TOML: {e}\n{file:?}"),
    };
    let back = match SyncRules::from_toml(&again) {
        Ok(r) => r,
        Err(e) => panic!("validated rules re-serialized do not validate: {e}\n{again}"),
    };
    assert_eq!(rules.schema(), back.schema(), "schema after a TOML round trip");
    assert_eq!(
        rules.strategies(),
        back.strategies(),
        "strategies after a TOML round trip"
    );
    assert_eq!(
        format!("{:?}", rules.buckets()),
        format!("{:?}", back.buckets()),
        "buckets after a TOML round trip"
    );
    for table in rules.schema().tables() {
        assert_eq!(
            rules.per_op_outcomes(&table.name),
            back.per_op_outcomes(&table.name),
            "per_op_outcomes of {} after a TOML round trip",
            table.name
        );
        let _ = rules.row_buckets(&table.name, "id-1", &RowData::new());
    }
}
