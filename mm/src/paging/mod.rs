//! The nested-paging engine: one 4-level table implementation, generic over
//! the vendor's entry format ([`Ept`] for Intel VT-x, [`Npt`] for AMD-V).
//!
//! ```text
//! NestedPageTable<F>  tree shape, walks, map/unmap/protect/translate,
//!                     split/merge, A/D harvesting, iteration
//!        |
//! EntryFormat         F::encode_leaf / decode_leaf / encode_table / ...
//!   Ept  Npt          the bits, per SDM Vol. 3C 29.3.2 and APM Vol. 2 15.25
//! ```

mod bulk;
mod ept;
mod format;
mod invalidation;
mod map;
mod npt;
mod scan;
mod split_merge;
mod table;
mod types;

pub use ept::Ept;
pub use format::EntryFormat;
pub use invalidation::{FlushScope, Invalidation};
pub use npt::Npt;
pub use scan::Mappings;
pub use table::NestedPageTable;
pub use types::{Access, Leaf, Mapping, MemType, PageSize, Translation};
