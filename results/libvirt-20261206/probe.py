"""Boot one testbed with a given -cpu and see what Xen and libvirtd make of it."""
import dataclasses, sys, time
from pathlib import Path
from softpage_testbed import Testbed, TestbedConfig, build_payload

xen, cpu, tag = sys.argv[1], sys.argv[2], sys.argv[3]
work = Path(f"/var/tmp/sp-libvirt/probe-{tag}")
work.mkdir(parents=True, exist_ok=True)
payload = Path(sys.argv[4]) if len(sys.argv) > 4 else work / "payload.img"
if not payload.exists():
    t = time.time(); info = build_payload(payload); print("payload", round(time.time() - t), "s", {k: v for k, v in info.items() if k.startswith("debs")})
config = dataclasses.replace(TestbedConfig.from_env(xen), cpu_model=cpu)
tb = Testbed(config, payload, work / "boot")
t = time.time()
try:
    tb.boot()
    print("boot", round(time.time() - t), "s", tb.boot_timings, flush=True)
    for cmd in ["xl info | grep -E 'hw_caps|virt_caps|xen_version|xen_extra'",
                "grep -m1 flags /proc/cpuinfo",
                "timeout 120 systemctl start libvirtd; sleep 5; timeout 60 virsh -q -c xen:///system capabilities | head -40",
                "journalctl -u libvirtd --no-pager | tail -15"]:
        r = tb.run(cmd, timeout_s=300)
        print("$", cmd, "\n", r.stdout, r.stderr, flush=True)
    if "guest" in sys.argv[5:]:
        from tests.e2e.helpers import start_guest
        t = time.time()
        g = start_guest(tb, "probe-guest")
        print("PVH guest up", round(time.time() - t), "s", g.verify(), flush=True)
        r = tb.run("xl list; xl dmesg | grep -i -E 'svm|hap|npt|vendor|triple' | head -20", timeout_s=120)
        print(r.stdout, flush=True)
finally:
    tb.shutdown()
