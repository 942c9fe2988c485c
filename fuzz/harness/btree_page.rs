//! The backend's page accessors on arbitrary page bytes: every read is a value or a corruption
//! error naming the page, never a panic or an out-of-bounds slice. Also the meta page decoder.
//!
//! Shared by the fuzz target (`fuzz_targets/btree_page.rs`) and the test that replays inputs
//! through it in the test suite (`engine/tests/fuzz_inputs.rs`).

use keel_engine::btree::page::{self, Kind, Meta, PageView};

const PAGE: usize = 4096;

/// One input: decoded as a meta page, then read through every accessor as a page, as it is
/// and sealed with a valid checksum (as a page read back from disk would be).
pub fn run(data: &[u8]) {
    let _ = Meta::decode(data);
    let mut bytes = data.to_vec();
    bytes.resize(PAGE, 0);
    let _ = Meta::decode(&bytes);
    for attempt in 0..2 {
        if attempt == 1 {
            let kind = match bytes[4] % 3 {
                0 => Kind::Leaf,
                1 => Kind::Branch,
                _ => Kind::Catalog,
            };
            let count = u16::from_le_bytes([bytes[6], bytes[7]]);
            page::seal(&mut bytes, kind, count, 0);
            assert!(page::checksum_ok(&bytes));
        }
        let Ok(view) = PageView::new(7, &bytes) else {
            continue;
        };
        let probe = &data[..data.len().min(32)];
        let _ = view.search(probe);
        for i in 0..view.len().min(512) {
            let _ = view.key(i);
            let _ = view.entry(i);
            match view.kind() {
                Kind::Branch => {
                    let _ = view.child(i);
                    let _ = view.child_index(probe);
                }
                _ => {
                    let _ = view.value(i);
                }
            }
        }
    }
}
