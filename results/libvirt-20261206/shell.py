"""Boot one testbed and run commands dropped as files into a spool directory (debugging)."""
import dataclasses, sys, time, os
from pathlib import Path
from softpage_testbed import Testbed, TestbedConfig

xen, cpu, tag, payload = sys.argv[1], sys.argv[2], sys.argv[3], Path(sys.argv[4])
work = Path(f"/var/tmp/sp-libvirt/shell-{tag}"); work.mkdir(parents=True, exist_ok=True)
spool = work / "spool"; spool.mkdir(exist_ok=True)
config = dataclasses.replace(TestbedConfig.from_env(xen), cpu_model=cpu)
tb = Testbed(config, payload, work / "boot")
t = time.time()
try:
    tb.boot()
    print("boot", round(time.time() - t), "s", flush=True)
    n = 0
    while True:
        cmds = sorted(spool.glob("*.cmd"))
        if not cmds:
            time.sleep(1); continue
        c = cmds[0]; text = c.read_text(); c.unlink()
        if text.strip() == "quit": break
        n += 1
        if text.startswith("PY:"):
            out = {}
            try:
                exec(text[3:], {"tb": tb, "out": out})
            except Exception as e:
                out["error"] = repr(e)
            (work / f"{c.stem}.out").write_text(repr(out))
        else:
            r = tb.run(text, timeout_s=900)
            (work / f"{c.stem}.out").write_text(f"rc={r.rc}\n{r.stdout}\n--stderr--\n{r.stderr}")
finally:
    tb.shutdown()
