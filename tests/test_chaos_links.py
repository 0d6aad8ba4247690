"""A proxy per link: each process role reaches each service through a proxy of its own, so a
scenario step hits exactly the link it names, and the services' old names act on every link of
their service. Against the real fault proxy (its HTTP API), driven by the scenario timeline."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
import trio

from chaos.proxy.server import serve
from chaos.runner import scenario as scenarios
from infra.system import LINK_ALIASES, LINKS, links_of

LATENCY = {"type": "latency", "name": "slow", "attributes": {"latency": 5}}


def test_every_role_has_its_own_link_and_the_old_names_cover_them() -> None:
    assert set(scenarios.PROXIES) == set(LINKS) | {"postgres", "redis", "bank"}
    assert {role for _service, role in LINKS.values()} == {"api", "worker", "janitor"}
    for alias, links in LINK_ALIASES.items():
        assert links == tuple(n for n, (service, _) in LINKS.items() if service == alias)
        assert links_of(alias) == links
    assert LINK_ALIASES["bank"] == ("bank_worker", "bank_janitor")  # the API never calls it
    assert all(links_of(link) == (link,) for link in LINKS)


async def _state(api: httpx.AsyncClient) -> dict[str, tuple[bool, list[str]]]:
    proxies: dict[str, Any] = (await api.get("/proxies")).json()
    return {n: (p["enabled"], sorted(t["name"] for t in p["toxics"])) for n, p in proxies.items()}


async def _steps(proxy_url: str, *raw: dict[str, Any]) -> list[int | str]:
    steps = [scenarios._step(r, f"step {i}") for i, r in enumerate(raw)]
    timeline = scenarios.Timeline(proxy_url, "", seed=1)
    await timeline.run(steps, trio.current_time())
    return [done["status"] for done in timeline.applied]


@pytest.mark.trio
async def test_a_step_acts_on_the_links_its_name_stands_for(nursery: trio.Nursery) -> None:
    _collection, port = await nursery.start(serve, "127.0.0.1", 0, [], 7)
    url = f"http://127.0.0.1:{port}"
    async with httpx.AsyncClient(base_url=url, timeout=10) as api:
        body = [{"name": n, "listen": "127.0.0.1:0", "upstream": "127.0.0.1:9"} for n in LINKS]
        assert (await api.post("/populate", json=body)).status_code == 201
        statuses = await _steps(
            url,
            {"action": "toxic", "proxy": "postgres_worker", "toxic": LATENCY},
            {"action": "disable", "proxy": "bank"},
            {"action": "toxic", "proxy": "redis", "toxic": LATENCY},
            {"action": "remove_toxic", "proxy": "redis_api", "name": "slow"},
        )
        assert statuses == [200, 200, 200, 204]
        state = await _state(api)
        touched = {
            "postgres_worker": (True, ["slow"]),
            "bank_worker": (False, []),
            "bank_janitor": (False, []),
            "redis_worker": (True, ["slow"]),
            "redis_janitor": (True, ["slow"]),
        }
        assert state == {n: touched.get(n, (True, [])) for n in LINKS}
        # An alias whose links do not all take the step fails it (here: no toxic "slow" on
        # redis_api any more), and the run then fails (Timeline.failures).
        [refused] = await _steps(url, {"action": "remove_toxic", "proxy": "redis", "name": "slow"})
        assert isinstance(refused, str) and "redis_api: 404" in refused
    nursery.cancel_scope.cancel()


@pytest.mark.parametrize("name", ["postgres_bank", "bank_api", "worker", ""])
def test_a_step_on_no_such_link_is_refused(name: str) -> None:
    with pytest.raises(scenarios.ScenarioError, match="proxy must be one of"):
        scenarios._step({"action": "disable", "proxy": name}, "step")


def test_a_system_behind_the_proxy_sends_each_role_through_its_own_links() -> None:
    from urllib.parse import urlparse

    from infra.system import scratch_system

    with scratch_system({"KIZO_WORKERS": "2"}, behind_proxy=True) as system:
        proxies = httpx.get(f"{system.proxy_url}/proxies", timeout=10).json()
        assert system.control is not None
        envs = system.control.envs
    assert set(proxies) == set(LINKS)
    variables = {"postgres": "DATABASE_URL", "redis": "REDIS_URL", "bank": "KIZO_BANK_URL"}
    for name in ("api", "worker-0", "worker-1", "janitor"):
        role = name.split("-")[0]
        for service, variable in variables.items():
            link = f"{service}_{role}"
            if link not in LINKS:  # the API never calls the bank
                continue
            port = urlparse(envs[name][variable]).port
            assert f"127.0.0.1:{port}" == proxies[link]["listen"], (name, link)
            assert proxies[link]["upstream"] == system.config.proxied_services()[service]
    assert envs["bank"]["DATABASE_URL"] == system.database_url  # the outside world: direct
