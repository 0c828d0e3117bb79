//! `--report-id`: a successful command's JSON report kept in the store's database for the
//! operator (`engine::job_report`), or the command fails.

use crate::engine::{Error, Store, job_report};

/// Checked before any work is done: a bad id must not cost an operation. `export_to` is an
/// export's destination: one to stdout has no report to keep.
pub(super) fn check(id: &str, export_to: Option<&str>) -> Result<(), Error> {
    job_report::check_operation_id(id)?;
    if export_to == Some("-") {
        return Err(Error::InvalidOperation(
            "--report-id records the report of an export to a destination, not to stdout".into(),
        ));
    }
    Ok(())
}

/// Records a successful command's JSON report; any failure is the command's failure, since
/// the operator must not count an operation whose report was lost as succeeded.
pub(super) async fn record(
    store: &Store,
    id: &str,
    kind: &str,
    rendered: &str,
) -> Result<(), Error> {
    let not_recorded = |reason: String| Error::ReportNotRecorded {
        operation: id.to_owned(),
        kind: kind.to_owned(),
        reason,
    };
    let report: serde_json::Value = serde_json::from_str(rendered)
        .map_err(|e| not_recorded(format!("the report is not JSON: {e}")))?;
    job_report::record(store.pool(), store.schema(), id, kind, &report)
        .await
        .map_err(|e| not_recorded(e.to_string()))?;
    Ok(())
}
