import pytest

from retina_dist.dist import discover, expand_nodelist


@pytest.mark.parametrize(
    "nodelist,hosts",
    [
        ("gpu[01-03,07]", ["gpu01", "gpu02", "gpu03", "gpu07"]),
        ("node7", ["node7"]),
        ("a[1-2],b[010-011],c", ["a1", "a2", "b010", "b011", "c"]),
        ("vm", ["vm"]),
    ],
)
def test_expand_nodelist(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts


def test_slurm_variables_alone_give_rank_world_and_rendezvous():
    env = discover(
        {
            "SLURM_PROCID": "5",
            "SLURM_NTASKS": "8",
            "SLURM_LOCALID": "1",
            "SLURM_JOB_NODELIST": "gpu[01-03,07]",
            "SLURM_JOB_ID": "4242",
        }
    )
    assert (env.rank, env.world_size, env.local_rank, env.launcher) == (5, 8, 1, "slurm")
    assert env.master_addr == "gpu01" and env.master_port == 15000 + 4242
    assert env.distributed and not env.is_main


def test_torchrun_variables_win_over_slurm_ones():
    env = discover(
        {
            "RANK": "1",
            "WORLD_SIZE": "2",
            "LOCAL_RANK": "1",
            "MASTER_ADDR": "h",
            "MASTER_PORT": "1234",
            "SLURM_PROCID": "0",
            "SLURM_NTASKS": "1",
        }
    )
    assert (env.rank, env.world_size, env.master_addr, env.master_port, env.launcher) == (
        1,
        2,
        "h",
        1234,
        "torchrun",
    )


def test_a_single_slurm_task_or_no_launcher_is_one_process():
    assert not discover({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}).distributed
    assert discover({}).world_size == 1
