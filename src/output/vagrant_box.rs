//! The contents of Vagrant boxes (`--format vagrant-libvirt|vagrant-virtualbox`):
//! the disk, metadata.json, a Vagrantfile, and for VirtualBox an OVF descriptor.
//! The caller packs them into the .box (a tar, gzipped with --compress).

use std::path::Path;

use anyhow::{Context, Result};

use super::qemu_img_convert;

const GIB: u64 = 1 << 30;

/// Whole GiB, rounded up: the unit of metadata.json's virtual_size.
pub fn gib_up(bytes: u64) -> u64 {
    bytes.div_ceil(GIB)
}

fn write(dir: &Path, name: &str, text: &str) -> Result<()> {
    let p = dir.join(name);
    std::fs::write(&p, text).with_context(|| format!("writing {}", p.display()))
}

pub fn libvirt_metadata(virtual_size: u64) -> serde_json::Value {
    serde_json::json!({
        "provider": "libvirt",
        "format": "qcow2",
        "virtual_size": gib_up(virtual_size),
    })
}

pub const LIBVIRT_VAGRANTFILE: &str = "\
# Written by vmdb: the defaults of a box made from a vmdb image.
Vagrant.configure(\"2\") do |config|
  config.vm.provider :libvirt do |libvirt|
    libvirt.driver = \"kvm\"
    libvirt.disk_bus = \"virtio\"
  end
end
";

/// box.img (qcow2), metadata.json, Vagrantfile in `dir`; returns the names to pack.
pub fn libvirt(raw: &Path, dir: &Path, virtual_size: u64) -> Result<Vec<String>> {
    write(
        dir,
        "metadata.json",
        &format!("{}\n", libvirt_metadata(virtual_size)),
    )?;
    write(dir, "Vagrantfile", LIBVIRT_VAGRANTFILE)?;
    qemu_img_convert(raw, &dir.join("box.img"), "qcow2", false)?;
    Ok(["metadata.json", "Vagrantfile", "box.img"]
        .map(String::from)
        .to_vec())
}

/// A MAC address in VirtualBox's range (08:00:27, the prefix VirtualBox gives its own
/// adapters), derived from the box name by SHA-256 so that the same spec gives the
/// same box, whatever vmdb was built with.
pub fn base_mac(name: &str) -> String {
    use crate::digest::{Digest, Sha256};
    let h = Sha256::digest(name.as_bytes());
    format!("080027{:02X}{:02X}{:02X}", h[0], h[1], h[2])
}

pub fn virtualbox_vagrantfile(mac: &str) -> String {
    format!(
        "# Written by vmdb: the defaults of a box made from a vmdb image.\n\
         Vagrant.configure(\"2\") do |config|\n  \
         config.vm.base_mac = \"{mac}\"\n\
         end\n"
    )
}

pub const VBOX_DISK: &str = "box-disk001.vmdk";

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// An OVF 1.0 descriptor: one VM (2 CPUs, 1 GiB), a SATA controller with the disk,
/// and a NAT network adapter.
pub fn ovf(name: &str, disk_file_size: u64, capacity: u64, mac: &str) -> String {
    let name = xml_escape(name);
    format!(
        r#"<?xml version="1.0" encoding="UTF-8"?>
<!-- Written by vmdb -->
<Envelope ovf:version="1.0" xml:lang="en-US"
    xmlns="http://schemas.dmtf.org/ovf/envelope/1"
    xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1"
    xmlns:rasd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData"
    xmlns:vssd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_VirtualSystemSettingData"
    xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"
    xmlns:vbox="http://www.virtualbox.org/ovf/machine">
  <References>
    <File ovf:id="file1" ovf:href="{VBOX_DISK}" ovf:size="{disk_file_size}"/>
  </References>
  <DiskSection>
    <Info>List of the virtual disks used in the package</Info>
    <Disk ovf:capacity="{capacity}" ovf:diskId="vmdisk1" ovf:fileRef="file1" ovf:format="http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized"/>
  </DiskSection>
  <NetworkSection>
    <Info>Logical networks used in the package</Info>
    <Network ovf:name="NAT">
      <Description>Logical network used by this appliance.</Description>
    </Network>
  </NetworkSection>
  <VirtualSystem ovf:id="{name}">
    <Info>A virtual machine</Info>
    <OperatingSystemSection ovf:id="96">
      <Info>The kind of installed guest operating system</Info>
      <Description>Debian_64</Description>
      <vbox:OSType ovf:required="false">Debian_64</vbox:OSType>
    </OperatingSystemSection>
    <VirtualHardwareSection>
      <Info>Virtual hardware requirements for a virtual machine</Info>
      <System>
        <vssd:ElementName>Virtual Hardware Family</vssd:ElementName>
        <vssd:InstanceID>0</vssd:InstanceID>
        <vssd:VirtualSystemIdentifier>{name}</vssd:VirtualSystemIdentifier>
        <vssd:VirtualSystemType>virtualbox-2.2</vssd:VirtualSystemType>
      </System>
      <Item>
        <rasd:Caption>2 virtual CPU</rasd:Caption>
        <rasd:Description>Number of virtual CPUs</rasd:Description>
        <rasd:ElementName>2 virtual CPU</rasd:ElementName>
        <rasd:InstanceID>1</rasd:InstanceID>
        <rasd:ResourceType>3</rasd:ResourceType>
        <rasd:VirtualQuantity>2</rasd:VirtualQuantity>
      </Item>
      <Item>
        <rasd:AllocationUnits>MegaBytes</rasd:AllocationUnits>
        <rasd:Caption>1024 MB of memory</rasd:Caption>
        <rasd:Description>Memory Size</rasd:Description>
        <rasd:ElementName>1024 MB of memory</rasd:ElementName>
        <rasd:InstanceID>2</rasd:InstanceID>
        <rasd:ResourceType>4</rasd:ResourceType>
        <rasd:VirtualQuantity>1024</rasd:VirtualQuantity>
      </Item>
      <Item>
        <rasd:Address>0</rasd:Address>
        <rasd:Caption>sataController0</rasd:Caption>
        <rasd:Description>SATA Controller</rasd:Description>
        <rasd:ElementName>sataController0</rasd:ElementName>
        <rasd:InstanceID>3</rasd:InstanceID>
        <rasd:ResourceSubType>AHCI</rasd:ResourceSubType>
        <rasd:ResourceType>20</rasd:ResourceType>
      </Item>
      <Item>
        <rasd:AddressOnParent>0</rasd:AddressOnParent>
        <rasd:Caption>disk1</rasd:Caption>
        <rasd:Description>Disk Image</rasd:Description>
        <rasd:ElementName>disk1</rasd:ElementName>
        <rasd:HostResource>/disk/vmdisk1</rasd:HostResource>
        <rasd:InstanceID>4</rasd:InstanceID>
        <rasd:Parent>3</rasd:Parent>
        <rasd:ResourceType>17</rasd:ResourceType>
      </Item>
      <Item>
        <rasd:Address>{mac}</rasd:Address>
        <rasd:AutomaticAllocation>true</rasd:AutomaticAllocation>
        <rasd:Caption>Ethernet adapter on 'NAT'</rasd:Caption>
        <rasd:Connection>NAT</rasd:Connection>
        <rasd:ElementName>Ethernet adapter on 'NAT'</rasd:ElementName>
        <rasd:InstanceID>5</rasd:InstanceID>
        <rasd:ResourceSubType>E1000</rasd:ResourceSubType>
        <rasd:ResourceType>10</rasd:ResourceType>
      </Item>
    </VirtualHardwareSection>
  </VirtualSystem>
</Envelope>
"#
    )
}

/// box-disk001.vmdk (stream-optimized), box.ovf, metadata.json, Vagrantfile in `dir`;
/// returns the names to pack.
pub fn virtualbox(raw: &Path, dir: &Path, virtual_size: u64, name: &str) -> Result<Vec<String>> {
    let disk = dir.join(VBOX_DISK);
    qemu_img_convert(raw, &disk, "vmdk", true)?;
    let disk_size = std::fs::metadata(&disk)
        .with_context(|| format!("{}", disk.display()))?
        .len();
    let mac = base_mac(name);
    write(
        dir,
        "metadata.json",
        &format!("{}\n", serde_json::json!({ "provider": "virtualbox" })),
    )?;
    write(dir, "Vagrantfile", &virtualbox_vagrantfile(&mac))?;
    write(dir, "box.ovf", &ovf(name, disk_size, virtual_size, &mac))?;
    Ok(["metadata.json", "Vagrantfile", "box.ovf", VBOX_DISK]
        .map(String::from)
        .to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn virtual_size_in_whole_gib() {
        assert_eq!(gib_up(1), 1);
        assert_eq!(gib_up(4 * GIB), 4);
        assert_eq!(gib_up(4 * GIB + 1), 5);
        assert_eq!(
            libvirt_metadata(3 * GIB).to_string(),
            r#"{"format":"qcow2","provider":"libvirt","virtual_size":3}"#
        );
    }

    #[test]
    fn mac_is_virtualbox_and_stable() {
        let m = base_mac("debian");
        assert_eq!(m.len(), 12);
        assert!(m.starts_with("080027"));
        // The same on every build of vmdb: the first bytes of the name's SHA-256.
        assert_eq!(m, "08002781D937");
        assert_ne!(base_mac("debian-arm64"), m);
        assert!(virtualbox_vagrantfile(&m).contains(&format!("base_mac = \"{m}\"")));
    }

    #[test]
    fn ovf_names_the_disk_and_escapes() {
        let x = ovf("a<b", 10, 20, "080027000000");
        assert!(x.contains(r#"ovf:href="box-disk001.vmdk" ovf:size="10""#));
        assert!(x.contains(r#"ovf:capacity="20""#));
        assert!(x.contains("a&lt;b") && !x.contains("a<b"));
    }
}
