#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| hypervisor_fuzz::uplink(data));
