"""Deploying an exported early-exit model: an HTTP server with micro-batching and metrics, and multi-tier
split inference (a device part that exits early, a server part that finishes).

* :mod:`.batcher`: requests gathered into micro-batches for the layer-skipping forward;
* :mod:`.app` (``jeidnn serve``): the FastAPI application of a whole model, a device tier or a server tier;
* :mod:`.tiers` (``jeidnn split``): a model cut after layer ``K`` into two loadable folders, and the two
  halves of the layer-skipping loop;
* :mod:`.payload`: what the device sends the server (hidden states of the real tokens, gate state);
* :mod:`.plan` (``jeidnn split --plan``): expected latency, bytes and server load of every split.

The serving stack (FastAPI, uvicorn, prometheus-client, httpx) is the optional extra ``jeidnn[serve]``;
only :mod:`.app`, :mod:`.server` and :mod:`.metrics` import it. docs/serving.md describes the protocol.
"""
