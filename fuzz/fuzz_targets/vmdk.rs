#![no_main]
//! Opens, reads, checks and writes fuzzed vmdk images from memory.

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    imgblock::fuzzing::exercise(imgblock::Format::Vmdk, data);
});
