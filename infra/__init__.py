"""The ground every part of Kizo stands on: configuration, the embedded servers, database pools
and migrations, the uvloop runner, the ASGI server, the command type, and the process table with
its scratch system. It imports none of ``api``, ``actors``, ``chaos`` or ``kizo`` (checked by
import-linter in ``make test``); those import it."""
