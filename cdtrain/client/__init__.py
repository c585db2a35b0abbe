"""A client of the cdtrain HTTP API (docs/api.md) and the ``cdtrain submit|status|list|watch`` commands.

    from cdtrain.client import ApiClient, ClientSettings

    async with ApiClient(ClientSettings(url="http://127.0.0.1:8080")) as api:
        accepted = await api.submit("s3://datasets/levir-cd/", config={"epochs": 50})
        view = await api.get(accepted.job_id)                 # schemas.jobs.JobView
        page = await api.list(status="running", limit=20)     # ingress.models.JobList
        async for frame in api.events(accepted.job_id):       # ViewFrame | StatusFrame | EndFrame
            ...

Never imports torch or ``snunet_cbam``. ``aiohttp`` is imported only when an :class:`ApiClient`
is used, so ``import cdtrain.client.cli`` (done by every ``cdtrain`` command) stays cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from cdtrain.client.settings import DEFAULT_URL, ClientSettings

if TYPE_CHECKING:
    from cdtrain.client.api import ApiClient

__all__ = ["DEFAULT_URL", "ApiClient", "ClientSettings"]


def __getattr__(name: str) -> object:
    if name == "ApiClient":
        from cdtrain.client.api import ApiClient

        return ApiClient
    raise AttributeError(name)
