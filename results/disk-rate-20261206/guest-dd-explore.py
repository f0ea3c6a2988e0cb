import re, sys, time, tempfile
from pathlib import Path
sys.path.insert(0, "/work/wt-disk")
from softpage_testbed import TestbedConfig, booted_testbed, build_payload, build_testbed, GuestSpec, XEN_PVH_VERSION

def out(guest, marker, command, timeout=300):
    head, tail = marker[:2], marker[2:]
    guest.console_command(f'echo "{head}""{tail} $( ({command}) 2>&1 | tr "\\n" " ")"')
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m = re.search(rf"(?m)^{marker} (.*)$", guest.console_log())
        if m:
            return m.group(1)
        time.sleep(1)
    return "TIMEOUT"

work = Path(tempfile.mkdtemp(prefix="softpage-explore-wt-disk-"))
with booted_testbed(TestbedConfig.from_env(XEN_PVH_VERSION), work) as tb:
    # booted_testbed builds its own payload? check
    g = tb.create_guest(GuestSpec(name="explore", memory_mb=256, anon_mb=16, cache_mb=0, load_kmod=False))
    g.wait_for_workload_ready()
    print("Q", out(g, "QPARAMS", "grep . /sys/block/xvdb/queue/max_sectors_kb /sys/block/xvdb/queue/read_ahead_kb /sys/block/xvdb/queue/max_hw_sectors_kb /sys/block/xvdb/queue/nr_requests /sys/module/xen_blkfront/parameters/* ; nproc; busybox | head -1"), flush=True)
    tb.run(f"dd if={tb.data_disk_device} of=/dev/null bs=1M count=256 iflag=direct")
    for i, cmd in enumerate([
        "dd if=/dev/xvdb of=/dev/null bs=1M count=64 iflag=direct",
        "dd if=/dev/xvdb of=/dev/null bs=1M count=64 skip=64",
        "echo 3 > /proc/sys/vm/drop_caches; dd if=/dev/xvdb of=/dev/null bs=64k count=1024 skip=2048 iflag=direct",
        "echo 3 > /proc/sys/vm/drop_caches; cat /data/data-004 /data/data-005 | dd of=/dev/null bs=1M",
        "echo 3 > /proc/sys/vm/drop_caches; dd if=/dev/xvdb of=/dev/null bs=4M count=16 skip=64 iflag=direct",
    ]):
        t = time.monotonic()
        print(i, cmd, "->", out(g, f"RES{i}X", cmd), f"[{time.monotonic()-t:.1f} s]", flush=True)
    print("dom0", tb.run("xl info | grep -E 'free_memory|nr_cpus'; uptime").stdout, flush=True)
