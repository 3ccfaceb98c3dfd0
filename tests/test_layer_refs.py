"""LayerRefs: a layer goes only when no checkpoint references it and no reader holds it."""

from __future__ import annotations

import asyncio
from pathlib import Path

from agentd.store.layers import LayerStore
from agentd.store.refs import LayerRefs


def _store(tmp_path: Path) -> tuple[LayerStore, list[str]]:
    store = LayerStore(tmp_path / "store")
    return store, [store.create_base(0, 0) for _ in range(3)]


class TestLayerRefs:
    def test_release_deletes_only_unreferenced_unheld_layers(self, tmp_path: Path) -> None:
        """Of the candidates, a referenced layer and a held one stay; the others go."""
        store, (a, b, c) = _store(tmp_path)
        refs = LayerRefs(store, lambda candidates: {a} & set(candidates))

        async def main() -> list[str]:
            refs.hold([b])
            return await refs.release([a, b, c])

        assert asyncio.run(main()) == [c]
        assert sorted(store.layers()) == sorted([a, b])

    def test_a_held_layer_goes_when_its_last_hold_ends(self, tmp_path: Path) -> None:
        """A released layer held twice survives the first hold's end and goes at the last."""
        store, (a, _, _) = _store(tmp_path)
        refs = LayerRefs(store, lambda candidates: set())

        async def main() -> list[bool]:
            first, second = refs.hold([a]), refs.hold([a])
            assert await refs.release([a]) == []
            seen = [a in store.layers()]
            await first.release()
            seen.append(a in store.layers())
            await second.release()
            await second.release()  # twice: no effect
            seen.append(a in store.layers())
            return seen

        assert asyncio.run(main()) == [True, True, False]

    def test_a_layer_a_checkpoint_took_meanwhile_stays(self, tmp_path: Path) -> None:
        """An orphan that a checkpoint references by the time its hold ends (a fork took
        it) is kept, and forgotten as an orphan."""
        store, (a, _, _) = _store(tmp_path)
        referenced: set[str] = set()
        refs = LayerRefs(store, lambda candidates: referenced & set(candidates))

        async def main() -> None:
            async with refs.hold([a]):
                await refs.release([a])
                referenced.add(a)
            referenced.clear()
            await refs.release([])

        asyncio.run(main())
        assert a in store.layers()
