#!/bin/bash
# dom0 configuration applied on top of the cached rootfs (in an overlay) before the image is made.
# Called by build.sh with ROOT (the tree to configure) and TESTBED_DIR.
set -euo pipefail
: "${ROOT:?}" "${TESTBED_DIR:?}"

echo softpage-dom0 > "$ROOT/etc/hostname"
echo "/dev/vda / ext4 rw,noatime,errors=remount-ro 0 1" > "$ROOT/etc/fstab"
chroot "$ROOT" passwd -d root >/dev/null

# A root shell on the console, for a person debugging by hand (the harness uses the agent).
mkdir -p "$ROOT/etc/systemd/system/serial-getty@hvc0.service.d"
cat > "$ROOT/etc/systemd/system/serial-getty@hvc0.service.d/autologin.conf" <<'UNIT'
[Service]
ExecStart=
ExecStart=-/sbin/agetty --autologin root --noclear --keep-baud 115200,38400,9600 %I $TERM
UNIT

printf '%s\n' xenfs xen-evtchn xen-gntdev xen-gntalloc xen-privcmd xen-blkback virtio_console \
    > "$ROOT/etc/modules-load.d/softpage-testbed.conf"
# xenconsoled logs every guest console to /var/log/xen/console/guest-NAME.log: the harness reads
# heartbeats and workload verdicts there.
sed -i '/^XENCONSOLED_ARGS=/d' "$ROOT/etc/default/xen"
echo 'XENCONSOLED_ARGS="--log=guest --log-dir=/var/log/xen/console"' >> "$ROOT/etc/default/xen"
# dom0 shutdown must not try to save guests to disk.
sed -i 's|^XENDOMAINS_SAVE=.*|XENDOMAINS_SAVE=""|' "$ROOT/etc/default/xendomains"
mkdir -p "$ROOT/var/log/xen/console" "$ROOT/opt/softpage"
# libvirt's daemon is off at boot: its libxl driver would start on every boot (TCG time) and
# libvirt-guests would save guests at shutdown. The tests that use libvirt start it.
systemctl --root="$ROOT" disable --quiet libvirtd.service libvirtd.socket libvirtd-ro.socket \
    libvirtd-admin.socket libvirt-guests.service

install -m 755 "$TESTBED_DIR/dom0/softpage-agent.py" "$ROOT/usr/local/sbin/softpage-agent"
install -m 644 "$TESTBED_DIR/dom0/softpage-agent.service" "$ROOT/etc/systemd/system/softpage-agent.service"
ln -sf /etc/systemd/system/softpage-agent.service "$ROOT/etc/systemd/system/multi-user.target.wants/softpage-agent.service"

cat > "$ROOT/etc/profile.d/softpage.sh" <<'PROFILE'
export PYTHONPATH=/opt/softpage/py
export PATH=/opt/softpage/bin:/opt/softpage/py/bin:$PATH
PROFILE
