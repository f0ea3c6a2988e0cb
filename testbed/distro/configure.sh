#!/bin/bash
# A distro guest's configuration, applied per session by payload.sh to an overlay of the cached
# guest tree (build.sh stage distro_RELEASE) before softpage-dkms goes in and the disk is made.
# What the testbed needs of the guest and nothing else: its disks, its address, nginx serving the
# application's files, a root shell on the console for the harness, and one console line when the
# boot is over. Called with ROOT, the tree to configure, and TESTBED_DIR.
set -euo pipefail
: "${ROOT:?}" "${TESTBED_DIR:?}"

echo softpage-guest > "$ROOT/etc/hostname"
printf '127.0.0.1 localhost\n127.0.1.1 softpage-guest\n' > "$ROOT/etc/hosts"
# xvda: this tree; xvdb: the application's files (build.sh stage app_data), read-only. No
# timeout for xvdb: on a loaded host its device unit came after systemd's default 90 s (or a
# 60 s limit), and without the files the guest has no application.
cat > "$ROOT/etc/fstab" <<'FSTAB'
/dev/xvda / ext4 rw,noatime,errors=remount-ro 0 0
/dev/xvdb /srv/app ext4 ro,x-systemd.device-timeout=0 0 0
FSTAB
mkdir -p "$ROOT/srv/app"
chroot "$ROOT" passwd -d root >/dev/null

# The harness types commands into this shell (softpage_testbed.distro.DistroGuest.shell).
mkdir -p "$ROOT/etc/systemd/system/serial-getty@hvc0.service.d"
install -m 644 "$TESTBED_DIR/hvc0-autologin.conf" "$ROOT/etc/systemd/system/serial-getty@hvc0.service.d/autologin.conf"

# The guest's address on dom0's bridge comes from its kernel command line (sp_addr=A.B.C.D/N,
# softpage_testbed.distro), so that the harness alone owns it.
install -m 755 /dev/stdin "$ROOT/usr/local/sbin/softpage-guest-net" <<'SCRIPT'
#!/bin/sh
set -e
address=$(sed -n 's/.*\bsp_addr=\([^ ]*\).*/\1/p' /proc/cmdline)
[ -n "$address" ] || exit 0
for i in $(seq 60); do [ -e /sys/class/net/eth0 ] && break; sleep 0.5; done
ip link set lo up
ip link set eth0 up
ip address add "$address" dev eth0
SCRIPT
cat > "$ROOT/etc/systemd/system/softpage-guest-net.service" <<'UNIT'
[Unit]
Description=Address on dom0's bridge from the kernel command line (softpage testbed)
DefaultDependencies=no
After=systemd-udevd.service
Before=network.target
Wants=network.target

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/usr/local/sbin/softpage-guest-net

[Install]
WantedBy=multi-user.target
UNIT

# One console line once the boot is over: systemd's verdict, the module's version and nginx's
# state (a unit whose dependency failed is not "failed": systemd can say "running" without it).
# Type=exec: the boot does not wait for this unit, which waits for the boot.
cat > "$ROOT/etc/systemd/system/softpage-guest-up.service" <<'UNIT'
[Unit]
Description=Tell the softpage testbed on the console that the boot is over

[Service]
Type=exec
ExecStart=/bin/sh -c 'state=$(systemctl is-system-running --wait); \
    version=$(cat /sys/module/softpage/version 2>/dev/null || echo absent); \
    echo "SOFTPAGE-GUEST-UP system=$state softpage=$version nginx=$(systemctl is-active nginx)" > /dev/hvc0'

[Install]
WantedBy=multi-user.target
UNIT
ln -sf /etc/systemd/system/softpage-guest-net.service "$ROOT/etc/systemd/system/multi-user.target.wants/"
ln -sf /etc/systemd/system/softpage-guest-up.service "$ROOT/etc/systemd/system/multi-user.target.wants/"

# nginx serves the application's files; no access log (its writes are not the application's).
rm -f "$ROOT/etc/nginx/sites-enabled/default"
cat > "$ROOT/etc/nginx/sites-enabled/softpage-app" <<'NGINX'
server {
    listen 80 default_server;
    root /srv/app;
    access_log off;
    location / {
        try_files $uri =404;
    }
}
NGINX
mkdir -p "$ROOT/etc/systemd/system/nginx.service.d"
printf '[Unit]\nRequiresMountsFor=/srv/app\n' > "$ROOT/etc/systemd/system/nginx.service.d/softpage-app.conf"

# Periodic jobs would read and write the disks in the middle of a measurement; the gettys on
# virtual terminals nobody sees (a PVH guest has no display) cost half a minute of a TCG boot.
for unit in apt-daily.timer apt-daily-upgrade.timer e2scrub_all.timer fstrim.timer \
    getty-static.service getty@tty1.service; do
    ln -sf /dev/null "$ROOT/etc/systemd/system/$unit"
done

# PostgreSQL (the Debian 12 guest's second application, build.sh add_postgresql): reachable from
# dom0's bridge without a password (the testbed's own network, nothing else reaches it), and not
# started at boot, so that a guest measured with nginx does not run it; the guest's-view bench
# starts it when it measures it.
for cluster in "$ROOT"/etc/postgresql/*/main; do
    [ -d "$cluster" ] || continue
    echo "listen_addresses = '*'" > "$cluster/conf.d/softpage-testbed.conf"
    echo "host all postgres 0.0.0.0/0 trust" >> "$cluster/pg_hba.conf"
    echo manual > "$cluster/start.conf"  # Debian's way: `systemctl start postgresql@15-main` still works
done
