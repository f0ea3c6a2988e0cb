"""Ad hoc (session 8): where a stock receiver's time goes after the stream's end, on the pair.
xl -vvv -t on both ends of a stock `xl migrate` host-a -> host-b over tcp_pipe, unshaped."""
import sys, tempfile, time
from pathlib import Path
from softpage_testbed import XEN_PVH_VERSION, TestbedConfig, booted_pair
from tests.bench.xen_bench import DOM0_TOOLS, REPO, install_dom0_tools
from tests.e2e.helpers import start_guest

out = Path(sys.argv[1])
config = TestbedConfig.from_env(XEN_PVH_VERSION)
with booted_pair(config, config, Path(tempfile.mkdtemp(prefix="softpage-restore-probe-"))) as pair:
    for testbed in pair.testbeds:
        install_dom0_tools(testbed)
        testbed.write_file(f"{DOM0_TOOLS}/tcp_pipe.py", (REPO / "tests/bench/dom0/tcp_pipe.py").read_text())
    guest = start_guest(pair.a, "probe")
    port = 5600
    pair.b.write_file("/tmp/stamp.py", "import sys, time\nfor line in sys.stdin:\n"
                      "    sys.stdout.write('%.3f %s' % (time.monotonic(), line)); sys.stdout.flush()\n")
    pair.b.write_file("/tmp/recv.sh", "{ xl -vvv migrate-receive 2>&1 1>&3 3>&- | python3 -u /tmp/stamp.py"
                      " > /tmp/recv.log; } 3>&1\n")
    pair.b.run(f"nohup python3 {DOM0_TOOLS}/tcp_pipe.py serve {port} 300 -- sh /tmp/recv.sh"
               f" > /dev/null 2>&1 &", check=True)
    started = time.monotonic()
    result = pair.a.run(["sh", "-c", f"xl -vvv -t migrate -s '' probe 'python3 {DOM0_TOOLS}/tcp_pipe.py "
                         f"connect {pair.name(pair.b)} {port}' 2> /tmp/send.log"], timeout_s=1200)
    print(f"rc {result.rc} in {time.monotonic() - started:.1f} s", flush=True)
    (out / "send.log").write_text(pair.a.run(["cat", "/tmp/send.log"]).stdout)
    time.sleep(5)
    (out / "recv.log").write_text(pair.b.run(["cat", "/tmp/recv.log"]).stdout)
    (out / "b-xl-list.txt").write_text(pair.b.run(["xl", "list"]).stdout)
