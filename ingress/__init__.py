"""The HTTP edge: train requests and bucket events in, job views and live status streams out.

- :func:`ingress.app.create_app` builds the aiohttp application from injected parts;
- :func:`ingress.main.run_ingress` wires the real bus and stores from :class:`IngressSettings`
  (``python -m ingress`` runs it with settings from the environment).

Never imports torch or ``snunet_cbam`` (tested): the edge starts in about a second on a small
CPU machine. Nothing is imported here, so ``import ingress.settings`` stays cheap.
"""
