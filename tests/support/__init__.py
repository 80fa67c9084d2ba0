"""Code that test workers load by configuration: misbehaving model families, a task that kills
its own pool process. Real code paths, loaded the way a user's plugin is."""
