"""``medseg serve``: an HTTP service for exported models (FastAPI + uvicorn, the optional extra
``medseg[deploy]``).

* :mod:`~medseg.serve.app`: the FastAPI app and its endpoints (:func:`create_app`);
* :mod:`~medseg.serve.service`: options and server state, one prediction's work;
* :mod:`~medseg.serve.uploads`: streaming, size-limited uploads, told apart by content; :mod:`~medseg.serve.zipped`:
  zips of one DICOM series, extracted safely;
* :mod:`~medseg.serve.routing`: the stable A/B assignment (SHA-256 of the patient or case id);
* :mod:`~medseg.serve.workers`: inference threads and the bounded queue (503 when full);
* :mod:`~medseg.serve.results`: the last results for download and the viewer's data;
* :mod:`~medseg.serve.metrics`, :mod:`~medseg.serve.requests_log`: ``/metrics`` and the CSV request log.

FastAPI is imported by :mod:`~medseg.serve.app` only, so the other modules work without it.
"""
