"""Two JAX processes on one machine: each reads its own share, and together they make the same global
batches as one process (as sets of examples: rows are ordered by process)."""
import json
import os
import socket
import subprocess
import sys
import textwrap

import numpy as np

from ldm_jax.data.config import default_data_config
from ldm_jax.data.pipeline import load_builder, make_dataset
from ldm_jax.sharding import make_mesh

CHILD = textwrap.dedent("""
    import json, sys
    import jax
    jax.distributed.initialize(coordinator_address=sys.argv[1], num_processes=2, process_id=int(sys.argv[2]))
    import numpy as np
    from jax.experimental import multihost_utils
    from ldm_jax.data.config import default_data_config
    from ldm_jax.data.pipeline import make_dataset
    from ldm_jax.sharding import make_mesh
    c = default_data_config()
    c.update_from_flattened_dict(json.loads(sys.argv[3]))
    it = make_dataset(c, mesh=make_mesh((2, 2, 1)), global_batch_size=8, seed=5)
    out = {"local": [], "global": [], "images": []}
    for _ in range(3):
        b = next(it)
        out["local"].append([int(x) for s in b["label"].addressable_shards for x in np.asarray(s.data)])
        out["global"].append(np.asarray(multihost_utils.process_allgather(b["label"], tiled=True)).tolist())
        img = np.asarray(multihost_utils.process_allgather(b["image"], tiled=True))
        out["images"].append(img.reshape(8, -1).sum(1).round(3).tolist())
    out["state"] = it.get_state()
    it.close()
    print("RESULT" + json.dumps(out))
""")


def test_two_processes_share_the_stream(tmp_path):
    c = default_data_config()
    c.data_dir = str(tmp_path)
    c.shapes.num_train, c.shapes.num_test, c.shapes.num_heldout = 64, 0, 0
    load_builder(c)  # prepared here, so the children only read
    flat = {"data_dir": c.data_dir, "shapes.num_train": 64, "shapes.num_test": 0, "shapes.num_heldout": 0}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": os.pathsep.join([os.getcwd(), *sys.path])}
    procs = [subprocess.Popen([sys.executable, "-c", CHILD, f"127.0.0.1:{port}", str(i), json.dumps(flat)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=240)
        assert p.returncode == 0, err[-3000:]
        results.append(json.loads(next(line[6:] for line in out.splitlines() if line.startswith("RESULT"))))

    ref = make_dataset(c, mesh=make_mesh((4, 2, 1)), global_batch_size=8, seed=5)  # one process, 8 devices
    for step in range(3):
        b = next(ref)
        labels = np.asarray(b["label"]).tolist()
        sums = np.asarray(b["image"]).reshape(8, -1).sum(1).round(3).tolist()
        local0, local1 = results[0]["local"][step], results[1]["local"][step]
        assert len(local0) == len(local1) == 4
        assert results[0]["global"][step] == results[1]["global"][step] == local0 + local1
        assert sorted(local0 + local1) == sorted(labels)
        np.testing.assert_allclose(sorted(results[0]["images"][step]), sorted(sums), atol=1e-2)
        # process p reads stream elements p, p+2, ...: its rows are the single-process batch's p::2
        assert local0 == labels[0::2] and local1 == labels[1::2]
    assert results[0]["state"]["num_processes"] == 2
    # the two-process state resumes a one-process run at the same place in the stream
    resumed = make_dataset(c, mesh=make_mesh((4, 2, 1)), global_batch_size=8, seed=5)
    resumed.set_state(json.loads(json.dumps(results[0]["state"])))
    for _ in range(2):
        np.testing.assert_array_equal(np.asarray(next(resumed)["label"]), np.asarray(next(ref)["label"]))
    ref.close()
    resumed.close()
