"""nosq side by side with the systems a user would pick instead (issue 7).

One invocation runs the same demo model, with the same batch cap and wait, under the same
offered load through each system:

* ``direct``: the model called in-process at the batch size the clients allow (the limit);
* ``nosq``: producer -> Redis -> manager -> Ray actor -> result (``benchmarks.peers.nosq``);
* ``serve-handle`` / ``serve-http``: Ray Serve with ``@serve.batch`` (``benchmarks.peers.serve``,
  ``benchmarks.peers.serve_http``);
* ``arq``: one job per request, a worker process that runs the model (``benchmarks.peers.arq_queue``).

``benchmarks.peers.load`` generates the load (closed loop over a concurrency sweep, open loop
at fixed rates) from several processes; ``benchmarks.peers.report`` prints the table, writes
the JSON and draws the plots. Run it as ``python -m benchmarks.peers --help`` from the
repository root.
"""
