#![no_main]
//! Opens, reads and checks fuzzed LUKS volumes from memory (header, key slots, payload; no
//! secret is given, so unlocking fails cleanly after the header is parsed).

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    imgblock::fuzzing::exercise(imgblock::Format::Luks, data);
});
