//! The vCPU state layout is pinned: when `vcpu::GuestState` changes shape,
//! this test fails until `VCPU_STATE_VERSION` is bumped (and these figures
//! updated), so old streams are refused by version instead of misread.

mod common;

use common::*;

#[test]
fn guest_state_encoding_is_pinned() {
    let bytes = postcard::to_allocvec(&vcpu_state(1)).unwrap();
    let default = postcard::to_allocvec(&vcpu::GuestState::default()).unwrap();
    let figures = (bytes.len(), CRC32C.checksum(&bytes), default.len(), CRC32C.checksum(&default));
    assert_eq!(
        (migrate::VCPU_STATE_VERSION, figures),
        (1, (495, 0x398c_ef08, 447, 0xc209_195a)),
        "GuestState's encoding changed: bump VCPU_STATE_VERSION and update the figures"
    );
}
