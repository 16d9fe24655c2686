#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tessera_fuzz::bodies::sender_key(data));
