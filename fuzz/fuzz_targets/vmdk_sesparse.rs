#![no_main]
//! Opens, reads and checks fuzzed seSparse extents (ESXi snapshots) through a descriptor.

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    imgblock::fuzzing::exercise_vmdk_sesparse(data);
});
