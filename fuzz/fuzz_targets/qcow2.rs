#![no_main]
//! Opens, reads, checks and writes fuzzed qcow2 images from memory.

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    imgblock::fuzzing::exercise(imgblock::Format::Qcow2, data);
});
