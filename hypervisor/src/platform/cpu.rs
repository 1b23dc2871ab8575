//! What this CPU is and offers, from CPUID (`raw-cpuid`).

use alloc::string::String;
use raw_cpuid::CpuId;

#[derive(Clone, Debug)]
pub struct CpuInfo {
    pub vendor: String,
    pub brand: String,
    pub family: u8,
    pub model: u8,
    pub stepping: u8,
    pub vmx: bool,
    pub svm: bool,
    /// Running under another hypervisor (CPUID.1:ECX[31]).
    pub nested: bool,
}

pub fn detect() -> CpuInfo {
    let id = CpuId::new();
    let vendor = id.get_vendor_info().map(|v| String::from(v.as_str())).unwrap_or_default();
    let brand = id.get_processor_brand_string().map(|b| String::from(b.as_str().trim())).unwrap_or_default();
    let f = id.get_feature_info();
    let ext = id.get_extended_processor_and_feature_identifiers();
    CpuInfo {
        vendor,
        brand,
        family: f.as_ref().map_or(0, |f| f.family_id()),
        model: f.as_ref().map_or(0, |f| f.model_id()),
        stepping: f.as_ref().map_or(0, |f| f.stepping_id()),
        vmx: f.as_ref().is_some_and(|f| f.has_vmx()),
        svm: ext.as_ref().is_some_and(|e| e.has_svm()),
        nested: f.as_ref().is_some_and(|f| f.has_hypervisor()),
    }
}
