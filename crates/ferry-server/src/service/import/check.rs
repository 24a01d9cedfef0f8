//! Every op of an import checked before anything is written (schema, row
//! limits: [`Inner::check_import_op`]), each turned into the entry the
//! write path takes. A large import is checked on two threads, its second
//! half on a helper while the caller checks the first; the refusal is the
//! first op's in import order either way.

use ferry_core::{CrudEntry, CrudOp, Table};
use parking_lot::Mutex;

use super::super::write::Refusal;
use super::super::Inner;
use super::MAX_IMPORT_BATCH_OPS;
use crate::error::{Result, ServiceError};

/// Imports of at least this many ops are checked on two threads.
const MIN_OPS_CHECKED_ON_TWO_THREADS: usize = 4 * MAX_IMPORT_BATCH_OPS;

/// Checked ops, as entries, with their tables.
type Checked<'t> = (Vec<CrudEntry>, Vec<&'t Table>);

impl Inner {
    /// Check `ops` (an import's, in order), appending each op's entry
    /// (carrying the validated op) to `entries` and its table to the
    /// answer. The first op refused refuses the import.
    pub(super) fn check_import(&self, mut ops: Vec<CrudOp>, entries: &mut Vec<CrudEntry>) -> Result<Vec<&Table>> {
        let n = ops.len();
        let second = if n >= MIN_OPS_CHECKED_ON_TWO_THREADS {
            ops.split_off(n / 2)
        } else {
            Vec::new()
        };
        let first_len = ops.len();
        let mut tables = Vec::with_capacity(n);
        // Where the helper takes the second half from (or the caller,
        // when no helper could start).
        let slot = Mutex::new(Some(second));
        let check_second = || match slot.lock().take() {
            Some(second) if !second.is_empty() => self.check_ops(second, first_len, n).map(Some),
            _ => Ok(None),
        };
        std::thread::scope(|scope| {
            let helper = (first_len < n)
                .then(|| {
                    std::thread::Builder::new()
                        .name("ferry-import-check".into())
                        .spawn_scoped(scope, check_second)
                        .ok()
                })
                .flatten();
            let first = self.check_ops_into(ops, 0, n, entries, &mut tables);
            let second = match helper.map(|h| h.join()) {
                Some(Ok(second)) => second,
                // The helper's panic, as if the caller had checked.
                Some(Err(panic)) => std::panic::resume_unwind(panic),
                None => check_second(),
            };
            // The first refusal in import order.
            first?;
            if let Some((mut second_entries, mut second_tables)) = second? {
                entries.append(&mut second_entries);
                tables.append(&mut second_tables);
            }
            Ok(tables)
        })
    }

    /// `ops` checked, numbered from `first` in an import of `n`.
    fn check_ops(&self, ops: Vec<CrudOp>, first: usize, n: usize) -> Result<Checked<'_>> {
        let mut entries = Vec::with_capacity(ops.len());
        let mut tables = Vec::with_capacity(ops.len());
        self.check_ops_into(ops, first, n, &mut entries, &mut tables)?;
        Ok((entries, tables))
    }

    /// [`Inner::check_ops`] appending to `entries` and `tables`.
    fn check_ops_into<'s>(
        &'s self,
        ops: Vec<CrudOp>,
        first: usize,
        n: usize,
        entries: &mut Vec<CrudEntry>,
        tables: &mut Vec<&'s Table>,
    ) -> Result<()> {
        for (i, op) in ops.into_iter().enumerate() {
            let (t, op) = self.check_import_op(op).map_err(|Refusal { reason, table, id }| {
                ServiceError::BadRequest(format!(
                    "import of {table}/{id} (op {} of {n}) rejected: {reason}; nothing was imported",
                    first + i
                ))
            })?;
            tables.push(t);
            entries.push(CrudEntry {
                seq: 0,
                tx_id: 0,
                op,
                previous: None,
                metadata: None,
                hlc: None,
            });
        }
        Ok(())
    }
}
