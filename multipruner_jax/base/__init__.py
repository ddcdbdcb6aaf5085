"""The shared base: mesh, atomic writes, folder locks, script start-up, console, agreement."""
