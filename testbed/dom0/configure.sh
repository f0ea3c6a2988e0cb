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
install -m 644 "$TESTBED_DIR/hvc0-autologin.conf" "$ROOT/etc/systemd/system/serial-getty@hvc0.service.d/autologin.conf"

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

# The two-host testbed (softpage_testbed/pair.py): the link's names and addresses, the unit that
# brings the link up when the kernel command line names this host, and ssh between the two
# dom0s without a prompt. Both dom0s of a pair boot one cached image (snapshot=on), and the
# Debian 12 and 13 images get the same keys (SSH_KEYS, made once per cache by build.sh), so one
# host key and one root key serve every host: a test image's keys, never a real host's.
: "${SSH_KEYS:?}"
mkdir -p "$ROOT/etc/softpage"
install -m 644 "$TESTBED_DIR/dom0/link-hosts" "$ROOT/etc/softpage/link-hosts"
install -m 755 "$TESTBED_DIR/dom0/softpage-link" "$ROOT/usr/local/sbin/softpage-link"
install -m 644 "$TESTBED_DIR/dom0/softpage-link.service" "$ROOT/etc/systemd/system/softpage-link.service"
ln -sf /etc/systemd/system/softpage-link.service "$ROOT/etc/systemd/system/multi-user.target.wants/softpage-link.service"
host_key=$(cut -d' ' -f1,2 "$SSH_KEYS/ssh_host_ed25519_key.pub")
{
    echo "# softpage two-host testbed (dom0/link-hosts)"
    awk '/^[a-z]/ && $1 != "device" {sub("/.*", "", $2); print $2, $1}' "$TESTBED_DIR/dom0/link-hosts"
} >> "$ROOT/etc/hosts"
awk -v key="$host_key" '/^[a-z]/ && $1 != "device" {sub("/.*", "", $2); print $1 "," $2, key}' \
    "$TESTBED_DIR/dom0/link-hosts" > "$ROOT/etc/ssh/ssh_known_hosts"
rm -f "$ROOT"/etc/ssh/ssh_host_*
install -m 600 "$SSH_KEYS/ssh_host_ed25519_key" "$ROOT/etc/ssh/ssh_host_ed25519_key"
install -m 644 "$SSH_KEYS/ssh_host_ed25519_key.pub" "$ROOT/etc/ssh/ssh_host_ed25519_key.pub"
install -d -m 700 "$ROOT/root/.ssh"
install -m 600 "$SSH_KEYS/id_ed25519" "$ROOT/root/.ssh/id_ed25519"
install -m 644 "$SSH_KEYS/id_ed25519.pub" "$ROOT/root/.ssh/id_ed25519.pub"
install -m 600 "$SSH_KEYS/id_ed25519.pub" "$ROOT/root/.ssh/authorized_keys"
# A dead peer is noticed within 20 s on both ends (5 s keep-alives, 4 unanswered): a cut link
# ends `ssh host-b xl migrate-receive` on the sender and its sshd session on the receiver, so
# both sides clean up instead of waiting for TCP's retransmission timeout (~15 minutes).
cat > "$ROOT/etc/ssh/sshd_config.d/softpage-testbed.conf" <<'SSHD'
HostKey /etc/ssh/ssh_host_ed25519_key
PermitRootLogin prohibit-password
PasswordAuthentication no
UseDNS no
ClientAliveInterval 5
ClientAliveCountMax 4
SSHD
cat > "$ROOT/etc/ssh/ssh_config.d/softpage-testbed.conf" <<'SSH'
Host *
    BatchMode yes
    StrictHostKeyChecking yes
    ServerAliveInterval 5
    ServerAliveCountMax 4
SSH
chroot "$ROOT" systemctl enable ssh.service >/dev/null 2>&1 ||
    ln -sf /lib/systemd/system/ssh.service "$ROOT/etc/systemd/system/multi-user.target.wants/ssh.service"
