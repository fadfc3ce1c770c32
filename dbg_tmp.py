import sys, time
from meshplan.plugins.testing import run_on_ranks
from tests.pipeline.test_compositions import CASES
from tests.pipeline.harness import pipeline_run, reference_run
from tests.parity import assert_parity
if __name__ == "__main__":
    name = sys.argv[1]
    spec, mesh, options, dp, cp = CASES[name]
    t = time.time()
    try:
        res = run_on_ranks(pipeline_run, 4, spec, mesh, options, data_parallel=dp, cp=cp, timeout=280)
    except Exception as e:
        print(str(e)[:6000]); raise SystemExit(1)
    ref = reference_run(spec)
    print(ref.losses, [r.losses for r in res])
    for r in res: assert_parity(r, ref)
    print("ok", name, time.time() - t)
