//! Fuzzes the ring-descriptor validator and the ring/arena header checks with arbitrary bytes,
//! as a hostile client could write them into shared memory.
#![no_main]

use kvd_proto::arena::ArenaHeader;
use kvd_proto::ring::{Completion, RingLayout, Submission, ENTRY_BYTES};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() >= ENTRY_BYTES {
        let mut e = [0u8; ENTRY_BYTES];
        e.copy_from_slice(&data[..ENTRY_BYTES]);
        if let Ok(s) = Submission::decode(&e) {
            assert_eq!(Submission::decode(&s.encode()), Ok(s));
        }
        let c = Completion::decode(&e);
        assert_eq!(Completion::decode(&c.encode()), c);
    }
    let _ = RingLayout::check_header(data, data.len());
    if let Ok(h) = ArenaHeader::read(data, 1 << 30) {
        let _ = h.check_slot(u64::from(data.len() as u32), 4096);
    }
});
