//! `oomwake-hog`: the test and benchmark workload (see `oomwake::hog`).

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let a = match oomwake::hog::parse_args(&args) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("oomwake-hog: {e}\nusage: oomwake-hog [--join CGROUP_DIR] [--touch SIZE] [--interval DUR] [--hold DUR] [--free-after DUR] [--tag NAME] [--write-file PATH:SIZE] [--barrier PATH:SIZE]");
            std::process::exit(2);
        }
    };
    if let Err(e) = oomwake::hog::run(&a) {
        eprintln!("oomwake-hog: {e}");
        std::process::exit(1);
    }
}
