"""The base layer every other package may use and that imports none of them: the mesh and
sharding rules, paths (local or gs://), several hosts, checkpoint I/O and the workdir lock,
metrics and the run profile, and the batch types that data, sampling and RL share."""
