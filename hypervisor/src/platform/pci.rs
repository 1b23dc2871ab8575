//! PCI configuration space through configuration mechanism #1 (ports
//! 0xcf8/0xcfc, PCI Local Bus Specification 3.0, 3.2.2.3.2). It reaches
//! segment 0, all the emulators here have; q35's ECAM would reach more, but
//! nothing needs it yet. The scan and decoding logic is `hypervisor::pci`.

use alloc::vec::Vec;
use hypervisor::pci::{self, Bdf, ConfigSpace, Function};
use spin::Mutex;
use virtio_drivers::transport::pci::bus::{ConfigurationAccess, DeviceFunction};
use x86_64::instructions::port::Port;

const CONFIG_ADDRESS: u16 = 0xcf8;
const CONFIG_DATA: u16 = 0xcfc;

/// The address and data ports form one register pair: a second access
/// between writing the address and using the data would hit the wrong
/// register, so every access holds this lock.
static PORTS: Mutex<()> = Mutex::new(());

/// Configuration space through the I/O ports.
#[derive(Clone, Copy, Debug, Default)]
pub struct PortConfig;

impl PortConfig {
    pub fn read(&self, bdf: Bdf, offset: u8) -> u32 {
        let _guard = PORTS.lock();
        // SAFETY: 0xcf8/0xcfc are the PC's configuration mechanism #1
        // ports; the lock makes the address/data pair atomic, and reading
        // configuration space has no side effects on the devices.
        unsafe {
            Port::<u32>::new(CONFIG_ADDRESS).write(pci::config_address(bdf, offset));
            Port::<u32>::new(CONFIG_DATA).read()
        }
    }

    /// Writes one configuration dword.
    ///
    /// # Safety
    ///
    /// Configuration writes reprogram devices (BARs, command register): the
    /// caller must know what the register does and that nothing else relies
    /// on its old value.
    pub unsafe fn write(&self, bdf: Bdf, offset: u8, value: u32) {
        let _guard = PORTS.lock();
        // SAFETY: the ports as in `read`; the effect of the write itself is
        // the caller's responsibility.
        unsafe {
            Port::<u32>::new(CONFIG_ADDRESS).write(pci::config_address(bdf, offset));
            Port::<u32>::new(CONFIG_DATA).write(value);
        }
    }
}

impl ConfigSpace for PortConfig {
    fn read32(&self, bdf: Bdf, offset: u8) -> u32 {
        self.read(bdf, offset)
    }
}

fn bdf(df: DeviceFunction) -> Bdf {
    Bdf { bus: df.bus, device: df.device, function: df.function }
}

/// What `virtio-drivers` needs to find a virtio device's capabilities and
/// BARs.
impl ConfigurationAccess for PortConfig {
    fn read_word(&self, df: DeviceFunction, offset: u8) -> u32 {
        self.read(bdf(df), offset)
    }

    fn write_word(&mut self, df: DeviceFunction, offset: u8, data: u32) {
        // SAFETY: virtio-drivers writes only the function it was handed (a
        // virtio device the block driver owns): BAR sizing, which it
        // restores with decoding off, and the command register.
        unsafe { self.write(bdf(df), offset, data) }
    }

    unsafe fn unsafe_clone(&self) -> Self {
        PortConfig
    }
}

/// Every function on the machine's buses (bus 0 and behind its bridges).
pub fn scan() -> Vec<Function> {
    pci::scan(&PortConfig)
}

/// The six BAR dwords of a type-0 header.
pub fn raw_bars(bdf: Bdf) -> [u32; 6] {
    core::array::from_fn(|i| PortConfig.read(bdf, pci::reg::BAR0 + 4 * i as u8))
}
