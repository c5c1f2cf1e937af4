"""Worker processes (private): the loop that runs tasks, and the runtime tasks see."""
