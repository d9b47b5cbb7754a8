#![no_main]
//! Opens, reads, writes and checks fuzzed LUKS volumes from memory: header, key slots and, for
//! inputs grown from `fixtures/disk.luks` (whose passphrase the exercise gives), the encrypted
//! payload.

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    imgblock::fuzzing::exercise(imgblock::Format::Luks, data);
});
